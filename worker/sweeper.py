"""The sweeper: restarts conversations that fell behind, e.g. because their worker was killed.

Dramatiq redelivers a dead worker's messages itself, but only after its heartbeat timeout and
in a maintenance pass that runs by chance; the sweeper makes recovery prompt and certain. Every
worker process runs one, and a short Redis lock lets only one of them sweep in each period.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from shared import keys
from shared.background import Periodic
from shared.conversations import reschedule, settle
from shared.logging import get_logger
from shared.tasks import kick_conversation, kick_delivery

log = get_logger(__name__)

INTERVAL_SECONDS = 5.0
# A conversation whose pending score is older than this has stalled (a live worker bumps it).
STALE_SECONDS = 15.0
BATCH = 500


def sweep(redis: Any, now: float | None = None, broker: Any = None) -> int:
    """Kick every stalled conversation whose work nobody holds; returns how many were kicked."""
    now = time.time() if now is None else now
    stale = redis.zrangebyscore(keys.PENDING, "-inf", now - STALE_SECONDS, start=0, num=BATCH)
    return sum(sweep_one(redis, conversation, now, broker) for conversation in stale)


def sweep_one(redis: Any, conversation: str, now: float, broker: Any = None) -> bool:
    pipe = redis.pipeline(transaction=False)
    pipe.llen(keys.inbox(conversation))
    pipe.llen(keys.processing(conversation))
    pipe.exists(keys.conversation_lock(conversation))
    pipe.lindex(keys.outbox(conversation), 0)
    pipe.exists(keys.outbox_lock(conversation))
    inbox, processing, engine_busy, head, sending = pipe.execute()
    kicked = False
    if (inbox or processing) and not engine_busy:
        kick_conversation(conversation, broker=broker)
        kicked = True
    if head is not None and not sending:
        kick_delivery(conversation, head, broker=broker)
        kicked = True
    if kicked:
        # Not kicked again on every pass while the kicked worker gets going.
        reschedule(redis, conversation, now)
        bot_id, sender = keys.split_conversation_id(conversation)
        log.info("sweeper.kicked", bot_id=bot_id, sender=sender, inbox=inbox + processing, outbox_head=head)
    elif not (inbox or processing or head):
        settle(redis, conversation)
    return kicked


class Sweeper(Periodic):
    """Sweeps every INTERVAL_SECONDS while it may take the cluster-wide turn."""

    name = "sweeper"

    def __init__(self, redis: Any, broker: Any = None, interval: float = INTERVAL_SECONDS) -> None:
        super().__init__()
        self._redis = redis
        self._broker = broker
        self.first_pause = self.pause_after_failure = self._interval = interval
        self._token = uuid.uuid4().hex

    def turn(self) -> float:
        # Only one process sweeps per period; the lock simply lapses, no one releases it.
        lock_ms = max(int(self._interval * 1000) - 200, 100)
        if self._redis.set(keys.SWEEPER_LOCK, self._token, nx=True, px=lock_ms):
            sweep(self._redis, broker=self._broker)
        return self._interval
