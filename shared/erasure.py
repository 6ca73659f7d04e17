"""Erasing what the service keeps of one person's conversation with one bot, on request
(`DELETE /app:<app>/graph/user:<id>/conversations/<E.164>`).

What goes: every message both ways, their delivery statuses, the conversation's entry, its dead
letters, a handoff to a human (with its note), and whatever is queued in Redis for the person or
scheduled for them in the database (nothing queued or scheduled is sent afterwards).
What stays: the opt-out record, if there is one (erasing it would let the bot text someone who
said STOP), and, until it expires, the 48-hour dedupe mark of each MessageSid (no content).
A record of the conversation still on its way from Redis to the database is dropped by the log's
writer (worker.logdrain), not written after the erase: the erase leaves a mark for a day.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, select

from shared import handoff, keys
from shared.db import transaction
from shared.schema import conversations, dead_letters, deliveries, messages, scheduled

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
    queued = _drop_queued(redis, conversation)
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
                keys.replies(conversation), keys.texted(conversation))
    pipe.zrem(keys.PENDING, conversation)
    *lengths, _, _ = pipe.execute()
    return sum(lengths)


def erased_since(redis: Any, conversations_: list[str]) -> dict[str, float]:
    """Of these conversations, those erased in the last day, with when."""
    if not conversations_:
        return {}
    marks = redis.mget([keys.erased(conversation) for conversation in conversations_])
    return {conversation: float(mark) for conversation, mark in zip(conversations_, marks) if mark is not None}
