"""Erasing what the service keeps of one person's conversation with one bot, on request
(`DELETE /app:<app>/graph/user:<id>/conversations/<E.164>`).

What goes: every message both ways, their delivery statuses, the conversation's entry, its dead
letters, a handoff to a human (with its note), whatever is queued in Redis for the person or
scheduled for them in the database (nothing queued or scheduled is sent afterwards), the handoff
forwards of their texts waiting in Dramatiq's outbound queues (delayed, or dead-lettered for
`dlq replay`), and the log's records of them that the database refused (keys.LOG_REFUSED).
What stays: the opt-out record, if there is one (erasing it would let the bot text someone who
said STOP), and, until it expires, the 48-hour dedupe mark of each MessageSid (no content; the
conversation's marks forget when the person texted, so the push window no longer counts them).
The erase leaves a mark for a day, which what is already in a worker's hands checks before it
acts: a record on its way from Redis to the database is dropped by the log's writer
(worker.logdrain); an engine's answer to a message the erase took away is neither queued nor
logged (shared.conversations' ERASED); a handoff forward a worker holds for later is not POSTed
(worker.handoff).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, select

from shared import handoff, keys, messagelog
from shared.conversations import forget_wrote
from shared.db import transaction
from shared.schema import conversations, dead_letters, deliveries, messages, scheduled
from shared.tasks import FORWARD_HANDOFF, NAMESPACE, OUTBOUND_QUEUE

# How long the mark lasts: far longer than any record waits on its way to the database.
ERASED_MARK_SECONDS = 86_400
_CHUNK = 500


@dataclass(frozen=True)
class Erased:
    messages: int
    dead_letters: int
    queued: int  # messages and replies that were waiting in Redis

    def public(self) -> dict[str, int]:
        return {"messages": self.messages, "dead-letters": self.dead_letters, "queued": self.queued}


def erase(engine: Engine, redis: Any, bot_id: int, person: str) -> Erased:
    conversation = keys.conversation_id(bot_id, person)
    redis.set(keys.erased(conversation), repr(time.time()), ex=ERASED_MARK_SECONDS)  # first: see the docstring
    queued = _drop_queued(redis, conversation) + _drop_forwards(redis, bot_id, person)
    _drop_refused_records(redis, conversation)
    with transaction(engine) as connection:
        sids = [sid for sid in connection.execute(
            select(messages.c.sid).where(messages.c.bot_id == bot_id, messages.c.person == person,
                                         messages.c.sid.is_not(None))).scalars()]
        for start in range(0, len(sids), _CHUNK):
            connection.execute(delete(deliveries).where(deliveries.c.sid.in_(sids[start:start + _CHUNK])))
        erased_messages = connection.execute(
            delete(messages).where(messages.c.bot_id == bot_id, messages.c.person == person)).rowcount
        connection.execute(delete(conversations).where(conversations.c.bot_id == bot_id,
                                                       conversations.c.person == person))
        erased_letters = connection.execute(
            delete(dead_letters).where(dead_letters.c.bot_id == bot_id, dead_letters.c.person == person)).rowcount
        handoff.forget(connection, redis, bot_id, person)
        queued += connection.execute(
            delete(scheduled).where(scheduled.c.bot_id == bot_id, scheduled.c.person == person)).rowcount
    return Erased(erased_messages, erased_letters, queued)


def _drop_queued(redis: Any, conversation: str) -> int:
    pipe = redis.pipeline(transaction=True)
    for key in (keys.inbox(conversation), keys.processing(conversation), keys.outbox(conversation)):
        pipe.llen(key)
    pipe.delete(keys.inbox(conversation), keys.processing(conversation), keys.outbox(conversation),
                keys.replies(conversation), keys.texted(conversation), keys.wrote(conversation))
    pipe.zrem(keys.PENDING, conversation)
    *lengths, _, _ = pipe.execute()
    forget_wrote(redis, conversation)  # the push window's mark; keys.wrote above is the previous release's
    return sum(lengths)


def _drop_forwards(redis: Any, bot_id: int, person: str) -> int:
    """Take the person's handoff forwards off the outbound queue, its delay queue and its dead
    letters (dramatiq's dispatch.lua: a list or sorted set of ids, their bodies in a hash beside
    it). One a worker already fetched is in its memory: worker.handoff checks the mark instead."""
    dropped = 0
    for queue in (OUTBOUND_QUEUE, OUTBOUND_QUEUE + ".DQ", OUTBOUND_QUEUE + ".XQ"):
        ids, bodies = f"{NAMESPACE}:{queue}", f"{NAMESPACE}:{queue}.msgs"
        for message_id, raw in redis.hscan_iter(bodies, count=500):
            if _forward_of(raw, bot_id, person):
                removed = redis.zrem(ids, message_id) if queue.endswith(".XQ") else redis.lrem(ids, 1, message_id)
                redis.hdel(bodies, message_id)
                dropped += bool(removed)
    return dropped


def _forward_of(raw: str | bytes, bot_id: int, person: str) -> bool:
    try:
        message = json.loads(raw)
        bot, payload = message["args"][:2] if message.get("actor_name") == FORWARD_HANDOFF else (None, None)
    except (ValueError, KeyError, TypeError):
        return False
    return bot == bot_id and isinstance(payload, dict) and payload.get("person") == person


def _drop_refused_records(redis: Any, conversation: str) -> None:
    """The log's records of the conversation that the database refused (they hold its texts)."""
    for raw in redis.lrange(keys.LOG_REFUSED, 0, -1):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and conversation_of_record(record) == conversation:
            redis.lrem(keys.LOG_REFUSED, 0, raw)


def conversation_of_record(record: dict[str, Any]) -> str | None:
    """The conversation a log record (worker.logdrain) tells of: an exchange's or a push's; None for an
    outcome (it holds no text or number) or a malformed record."""
    if record.get("kind") == messagelog.PUSHED and record.get("replies"):
        reply = record["replies"][0]  # one record per conversation
        return keys.conversation_id(reply["bot_id"], reply["to"])
    message = record.get("message") if record.get("kind") == "exchange" else None
    if not isinstance(message, dict) or "bot_id" not in message or "sender" not in message:
        return None
    return keys.conversation_id(message["bot_id"], message["sender"])


def recorded_at(record: dict[str, Any]) -> float:
    """When what a log record tells of happened: the push queued, or the text received."""
    if record.get("kind") == messagelog.PUSHED:
        return float(record["replies"][0].get("created_at") or 0)
    return float(record["message"].get("received_at", 0))


def erased_since(redis: Any, conversations_: list[str]) -> dict[str, float]:
    """Of these conversations, those erased in the last day, with when."""
    if not conversations_:
        return {}
    marks = redis.mget([keys.erased(conversation) for conversation in conversations_])
    return {conversation: float(mark) for conversation, mark in zip(conversations_, marks) if mark is not None}
