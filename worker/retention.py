"""The retention job: every worker process runs one, and a Redis lease lets one purge at a time."""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import Engine

from shared import keys
from shared.background import Periodic
from shared.logging import get_logger
from shared.retention import DAY_SECONDS, purge
from worker.logdrain import forget_refused_before

log = get_logger(__name__)

INTERVAL_SECONDS = 3600.0
# A worker's first pass, once it has settled in after its start.
FIRST_PASS_SECONDS = 60.0
# Longer than a purge takes; the holder releases it when done, a crashed one lets it lapse.
LEASE_SECONDS = 1800

# Release the lease only if it is still ours.
_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def run_once(redis: Any, engine: Engine, days: int, token: str | None = None) -> bool:
    """Purge if no other process is purging; returns whether this one did."""
    token = token or uuid.uuid4().hex
    if not redis.set(keys.RETENTION_LOCK, token, nx=True, ex=LEASE_SECONDS):
        return False
    try:
        purged = purge(engine, days)
        refused = forget_refused_before(redis, time.time() - days * DAY_SECONDS)
        log.info("retention.purged", days=days, rows=purged.total, batches=purged.batches, refused_records=refused,
                 **purged.rows)
    finally:
        redis.eval(_RELEASE_LUA, 1, keys.RETENTION_LOCK, token)
    return True


class Retention(Periodic):
    """Purges every `interval` seconds (the first pass a minute after start)."""

    name = "retention"

    def __init__(self, redis: Any, engine: Engine, days: int, interval: float = INTERVAL_SECONDS) -> None:
        super().__init__()
        self._redis, self._engine, self._days, self._interval = redis, engine, days, interval
        self.first_pause = min(FIRST_PASS_SECONDS, interval)
        self.pause_after_failure = interval

    def turn(self) -> float:
        run_once(self._redis, self._engine, self._days)
        return self._interval
