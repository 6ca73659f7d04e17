"""Human handoff: a conversation a human has taken over, whose messages the bot's engine no longer sees.

The database (`handoffs`) is the record: one row per paused (bot, person), with since when, until
when (the bot's handoff-timeout; none: until resumed), who paused it (an operator through the API,
or the engine with a `{"custom": {"handoff": true}}` item) and the note given.

The worker must know on every message whether its conversation is paused, without a query: Redis
keeps a copy per bot, the hash keys.handoffs(bot_id), which the step that hands the worker its next
message reads in the same round trip. The copy is a hint: a person it lists is confirmed in the
database before the engine is passed over (a resume, or a timeout, may have come since); a person
it does not list is not paused, once the copy holds LOADED. A copy without LOADED (a flush, a
restart) is rebuilt from the database before it is trusted; a rebuild only ever adds, so a pause
written meanwhile is never dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis as redis_lib
from sqlalchemy import Connection, Engine, delete, select
from sqlalchemy.exc import SQLAlchemyError

from shared import keys
from shared.db import insert, transaction
from shared.flight import SingleFlight
from shared.logging import get_logger
from shared.redis import script
from shared.schema import handoffs

log = get_logger(__name__)

LOADED = "#loaded"
BY_OPERATOR, BY_ENGINE = "operator", "engine"
MAX_NOTE = 1000


@dataclass(frozen=True)
class Handoff:
    """One paused conversation."""

    bot_id: int
    person: str
    since: float
    until: float | None  # None: until resumed
    by: str
    note: str | None
    message_sid: str | None = None  # the inbound whose engine answer asked for it

    def active(self, now: float | None = None) -> bool:
        return self.until is None or self.until > (time.time() if now is None else now)

    def row(self) -> dict[str, Any]:
        return {"bot_id": self.bot_id, "person": self.person, "since": self.since, "until": self.until, "by": self.by,
                "note": self.note, "message_sid": self.message_sid}

    def public(self) -> dict[str, Any]:
        return {"paused": True, "since": self.since, "until": self.until, "by": self.by, "note": self.note}


NOT_PAUSED: dict[str, Any] = {"paused": False}


def pause(engine: Engine, redis: Any, bot_id: int, person: str, *, by: str, timeout: int,
          note: str | None = None, message_sid: str | None = None) -> Handoff:
    """Pause the bot for `person`; pausing a paused conversation keeps its `since` and takes the
    new note, and its timeout counts from now. The database first, then the copy; a copy that
    cannot be told undoes the record (and raises), so the two never disagree the dangerous way:
    a pause the record has and the copy does not would go unobeyed."""
    now = time.time()
    until = now + timeout if timeout else None
    note = note[:MAX_NOTE] if note else None
    with transaction(engine) as connection:
        old = _row(connection, bot_id, person)
        since = old.since if old is not None and old.active(now) else now
        statement = insert(connection, handoffs).values(bot_id=bot_id, person=person, since=since, until=until, by=by,
                                                        note=note, message_sid=message_sid)
        connection.execute(statement.on_conflict_do_update(
            index_elements=[handoffs.c.bot_id, handoffs.c.person],
            set_={"since": since, "until": until, "by": by, "note": note, "message_sid": message_sid}))
    try:
        redis.hset(keys.handoffs(bot_id), person, repr(until or 0))
    except redis_lib.RedisError:
        with transaction(engine) as connection:
            connection.execute(delete(handoffs).where(handoffs.c.bot_id == bot_id, handoffs.c.person == person))
            if old is not None:
                connection.execute(insert(connection, handoffs).values(**old.row()))
        raise
    return Handoff(bot_id, person, since, until, by, note, message_sid)


def resume(engine: Engine, redis: Any, bot_id: int, person: str) -> Handoff | None:
    """Give the conversation back to the bot; the handoff it ended, if it was paused."""
    with transaction(engine) as connection:
        old = _row(connection, bot_id, person)
        connection.execute(delete(handoffs).where(handoffs.c.bot_id == bot_id, handoffs.c.person == person))
    redis.hdel(keys.handoffs(bot_id), person)
    return old if old is not None and old.active() else None


def current(engine: Engine, redis: Any, bot_id: int, person: str, hint: str) -> Handoff | None:
    """The conversation's handoff if it is paused now, from the database; `hint` is what the copy
    said. A stale hint (a resume the copy missed, a timeout) is dropped from the copy unless a new
    pause has replaced it meanwhile; a pause whose time is up is ended in the record too."""
    try:
        with engine.connect() as connection:
            found = _row(connection, bot_id, person)
    except SQLAlchemyError as error:
        # The database is unreachable: the copy's word stands, with the timeout it holds.
        log.warning("handoff.unconfirmed", bot_id=bot_id, error=error.__class__.__name__)
        hinted = Handoff(bot_id, person, since=0.0, until=float(hint) or None, by="unknown", note=None)
        return hinted if hinted.active() else None
    if found is not None and found.active():
        return found
    if found is not None:
        with transaction(engine) as connection:
            connection.execute(delete(handoffs).where(handoffs.c.bot_id == bot_id, handoffs.c.person == person,
                                                      handoffs.c.until == found.until))
    script(redis, _FORGET_HINT_LUA)(keys=[keys.handoffs(bot_id)], args=[person, hint])
    return None


# KEYS: the copy. ARGV: the person, the hint read. Only that hint goes: a new pause wrote another.
_FORGET_HINT_LUA = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0"


def active_of(connection: Connection, bot_id: int, people: list[str]) -> dict[str, Handoff]:
    """Of these people, those whose conversation with the bot is paused now."""
    if not people:
        return {}
    rows = connection.execute(select(handoffs).where(handoffs.c.bot_id == bot_id, handoffs.c.person.in_(people)))
    now = time.time()
    return {row.person: handoff for row in rows if (handoff := _handoff(row)).active(now)}


# A copy missing is rebuilt by one caller of this process at a time; the others wait for that rebuild.
_LOADS = SingleFlight()


def load_copy(engine: Engine, redis: Any, bot_id: int) -> None:
    """Rebuild the bot's copy from the database (after a flush): adds every active pause, then LOADED."""
    _LOADS.run(bot_id, lambda: _load_copy(engine, redis, bot_id))


def _load_copy(engine: Engine, redis: Any, bot_id: int) -> None:
    now = time.time()
    with engine.connect() as connection:
        rows = [_handoff(row) for row in connection.execute(select(handoffs).where(handoffs.c.bot_id == bot_id))]
    mapping = {handoff.person: repr(handoff.until or 0) for handoff in rows if handoff.active(now)}
    redis.hset(keys.handoffs(bot_id), mapping={**mapping, LOADED: "1"})


def forget(connection: Connection, redis: Any, bot_id: int, person: str) -> None:
    """An erased conversation's pause (its note may name the person); the bot answers them again."""
    connection.execute(delete(handoffs).where(handoffs.c.bot_id == bot_id, handoffs.c.person == person))
    redis.hdel(keys.handoffs(bot_id), person)


def _row(connection: Connection, bot_id: int, person: str) -> Handoff | None:
    row = connection.execute(select(handoffs).where(handoffs.c.bot_id == bot_id, handoffs.c.person == person)).first()
    return None if row is None else _handoff(row)


def _handoff(row: Any) -> Handoff:
    return Handoff(row.bot_id, row.person, row.since, row.until, row.by, row.note, row.message_sid)
