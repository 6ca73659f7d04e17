"""The scheduler: every worker process looks, once a second, for scheduled and held messages that
are due (shared.schedule) and queues each on its conversation, where it goes out like an
operator's send: in order, paced, sent once.

At its time a message obeys what stands then: a person who opted out meanwhile gets nothing, an
engine's push to a conversation a human has taken over, or to a person who has not written within
the bot's push-window-days by then, is dropped, and one due inside the
person's quiet hours waits on until they end. Taking a message from the database and queuing it
happen in one database transaction; the Redis step that queues it also marks it queued
(keys.scheduled_queued), so a worker killed before its commit leaves it waiting and the next pass
does not queue it twice.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, Engine

from shared import handoff, keys, messagelog, optout, schedule
from shared.background import Periodic
from shared.bots import Bot
from shared.conversations import QUEUE_FUNCTION, queue_args, queue_keys_of, replies_from
from shared.db import transaction
from shared.logging import get_logger
from shared.redis import script
from shared.tasks import kick_delivery

log = get_logger(__name__)

INTERVAL_SECONDS = 1.0
MARK_SECONDS = 24 * 3600

# KEYS: QUEUE_FUNCTION's six, then the message's queued mark. ARGV: QUEUE_FUNCTION's five, then (id, reply)s.
_QUEUE_ONCE_LUA = QUEUE_FUNCTION + f"""
if not redis.call('SET', KEYS[7], '1', 'NX', 'EX', {MARK_SECONDS}) then return false end
return queue(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 6)
"""


class Scheduler(Periodic):
    name = "scheduler"
    first_pause = pause_after_failure = INTERVAL_SECONDS

    def __init__(self, redis: Any, engine: Engine, bot_of: Any) -> None:
        super().__init__()
        self._redis, self._engine, self._bot_of = redis, engine, bot_of

    def turn(self) -> float:
        run_due(self._redis, self._engine, self._bot_of)
        return INTERVAL_SECONDS


def run_due(redis: Any, engine: Engine, bot_of: Any, now: float | None = None) -> int:
    """Queue (or drop, or hold on) every message due by `now`; returns how many were queued. Also
    tells /metrics how many wait."""
    now = time.time() if now is None else now
    with engine.connect() as connection:
        items = schedule.due(connection, now)
        counts = schedule.waiting_counts(connection)
    redis.hset(keys.SCHEDULED_WAITING, mapping=counts)
    if not items:
        return 0  # no write transaction: on SQLite it would take the database's write lock every second
    # Read before the transaction: on SQLite a bot cache's miss inside it would wait for its own lock.
    bots = {bot_id: bot_of(bot_id) for bot_id in {item.bot_id for item in items}}
    kicks: list[tuple[str, str]] = []
    with transaction(engine) as connection:
        for item in items:
            kick = _dispatch(connection, redis, item, bots[item.bot_id], now)
            if kick is not None:
                kicks.append(kick)
    for conversation, reply_id in kicks:  # after the commit: the replies' log rows are there
        if reply_id:
            kick_delivery(conversation, reply_id)
    return len(kicks)


def _dispatch(connection: Connection, redis: Any, item: schedule.Scheduled, bot: Bot | None,
              now: float) -> tuple[str, str] | None:
    """Queue one due message, or settle why it does not go; the conversation and reply to kick."""
    if bot is None:
        return _settle(connection, item, schedule.BOT_GONE)
    until = schedule.quiet_until(bot, item.person, now)
    if until is not None:
        schedule.hold(connection, item.id, until)
        log.info("scheduled.held", bot_id=bot.id, scheduled_id=item.id, until=until)
        return None
    conversation = keys.conversation_id(bot.id, item.person)
    sender = (redis.get(keys.texted(conversation)) if bot.pooled else None) or bot.number
    state = optout.read(connection, bot.opt_out_key(sender), item.person)
    if state is not None and state.opted_out:
        return _settle(connection, item, schedule.OPTED_OUT)
    if item.origin == messagelog.CALLBACK and handoff.active_of(connection, bot.id, [item.person]):
        return _settle(connection, item, schedule.HANDED_OFF)
    if item.origin == messagelog.CALLBACK and not bot.limits.allow_cold_push and not messagelog.people_who_wrote(
            connection, bot.id, [item.person], now - bot.limits.push_window_days * 86400):
        return _settle(connection, item, schedule.OUTSIDE_PUSH_WINDOW)  # the person went quiet meanwhile
    if not schedule.finish(connection, item.id, schedule.QUEUED):
        return None  # cancelled, or taken by another worker, meanwhile
    replies = replies_from(conversation, item.person, item.text or None, item.media_url)
    for n, reply in enumerate(replies):
        reply["id"] = f"{item.id}-{n}"  # the same ids if a pass that died is run again
    messagelog.record_replies(connection, replies, sender, origin=item.origin)
    leading, pairs = queue_args(conversation, replies)
    kick = script(redis, _QUEUE_ONCE_LUA)(keys=[*queue_keys_of(conversation), keys.scheduled_queued(item.id)],
                                          args=leading + pairs)
    log.info("scheduled.queued", bot_id=bot.id, scheduled_id=item.id, reason=item.reason, replies=len(replies))
    return conversation, kick or ""


def _settle(connection: Connection, item: schedule.Scheduled, state: str) -> None:
    if schedule.finish(connection, item.id, state):
        log.info("scheduled.not_sent", bot_id=item.bot_id, scheduled_id=item.id, state=state)
    return None
