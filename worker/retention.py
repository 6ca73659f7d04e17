"""The retention job: every worker process runs one, and a Redis lease lets one purge at a time."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from sqlalchemy import Engine

from shared import keys
from shared.logging import get_logger
from shared.retention import purge

log = get_logger(__name__)

INTERVAL_SECONDS = 3600.0
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
        log.info("retention.purged", days=days, rows=purged.total, batches=purged.batches, **purged.rows)
    finally:
        redis.eval(_RELEASE_LUA, 1, keys.RETENTION_LOCK, token)
    return True


class Retention:
    """A daemon thread purging every `interval` seconds (the first pass soon after start)."""

    def __init__(self, redis: Any, engine: Engine, days: int, interval: float = INTERVAL_SECONDS) -> None:
        self._redis, self._engine, self._days, self._interval = redis, engine, days, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> Retention:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = min(60.0, self._interval)
        while not self._stop.wait(delay):
            delay = self._interval
            try:
                run_once(self._redis, self._engine, self._days)
            except Exception:  # noqa: BLE001 - a database or Redis blip must not end the job
                log.warning("retention.failed", exc_info=True)
