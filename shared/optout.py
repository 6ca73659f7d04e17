"""Opt-out: the keywords, the record of who opted out of each bot number, and its Redis copy.

The database (`opt_outs`) is the record: one row per (bot number, person) with its latest state,
how it changed and when. Redis keeps a copy per bot number, the hash keys.opted_out(number), for
the two paths that must not query the database: the webhook's accept script, which writes STOP
and START into the copy in the step that queues the message (so a reply in flight is suppressed
at once), and the look before every send.

The copy's fields: LOADED once the copy holds every opt-out of the database; a person the copy
learnt of itself (the accept script, a 21610) maps to LIVE and is trusted; a person it took from
the database maps to FROM_DATABASE and is confirmed there before a send is suppressed, since an
opt-in recorded while the copy was being built may have come after the read. A copy without
LOADED (a flush, a restart without persistence) is rebuilt before the send it was asked for, as
a union: a STOP the accept script has just written is never dropped.

A bot's opt-outs follow it: when a registry change takes a key (a number, or its service) away
from the bot, `carry_over` copies that key's rows onto every key it now has, in the registry
change's transaction, and `carry_over_copies` does the same for the copy once it is committed. The
rows under the old key stay: a send that began under the bot as it was still finds them.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import SQLAlchemyError

from shared import keys
from shared.db import insert, transaction
from shared.flight import SingleFlight
from shared.logging import get_logger
from shared.schema import opt_outs

log = get_logger(__name__)

OPT_OUT_KEYWORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"})
OPT_IN_KEYWORDS = frozenset({"START", "YES", "UNSTOP"})

MESSAGE, OPT_OUT, OPT_IN = "message", "opt_out", "opt_in"

# The copy's fields and values (a person is an address Twilio gives, never starting with "#").
LOADED = "#loaded"
LIVE = "live"
FROM_DATABASE = "db"

HOW_21610 = "error 21610"


def classify(body: str | None, opt_out_type: str | None = None) -> str:
    """The engine event an inbound text stands for: Twilio's OptOutType wins, else the whole body."""
    kind = (opt_out_type or "").strip().upper()
    if kind == "STOP":
        return OPT_OUT
    if kind == "START":
        return OPT_IN
    word = (body or "").strip().upper()
    if word in OPT_OUT_KEYWORDS:
        return OPT_OUT
    if word in OPT_IN_KEYWORDS:
        return OPT_IN
    return MESSAGE


# --- The record (the database) ------------------------------------------------------------


@dataclass(frozen=True)
class OptOut:
    """One person's latest opt-out state towards one bot number."""

    bot_number: str
    person: str
    opted_out: bool
    how: str
    at: float


def record(connection: Connection, bot_number: str, person: str, opted_out: bool, how: str,
           at: float | None = None) -> None:
    """Upsert the person's state; an older event than the one recorded (a retried or late one) changes nothing."""
    _upsert(connection, [{"bot_number": bot_number, "person": person, "opted_out": opted_out, "how": how,
                          "at": time.time() if at is None else at}])


def _upsert(connection: Connection, rows: list[dict[str, Any]]) -> None:
    statement = insert(connection, opt_outs)
    connection.execute(statement.on_conflict_do_update(
        index_elements=[opt_outs.c.bot_number, opt_outs.c.person],
        set_={"opted_out": statement.excluded.opted_out, "how": statement.excluded.how, "at": statement.excluded.at},
        where=opt_outs.c.at <= statement.excluded.at,
    ), rows)


def carry_over(connection: Connection, before: Collection[str], after: Collection[str]) -> list[str]:
    """Copy the rows of the keys in `before` but not in `after` onto every key in `after` (the
    latest state of each person wins), so a bot's STOPs hold across a change of its numbers or
    service; returns the keys given up."""
    gone = sorted(set(before) - set(after))
    if not gone or not after:
        return []
    latest: dict[str, dict[str, Any]] = {}  # one row per person: an upsert may not touch a row twice
    for row in connection.execute(select(opt_outs).where(opt_outs.c.bot_number.in_(gone)).order_by(opt_outs.c.at)):
        latest[row.person] = dict(row._mapping)
    moved = [{**row, "bot_number": key} for key in sorted(after) for row in latest.values()]
    if moved:
        _upsert(connection, moved)
    return gone


def read(connection: Connection, bot_number: str, person: str) -> OptOut | None:
    row = connection.execute(
        select(opt_outs).where(opt_outs.c.bot_number == bot_number, opt_outs.c.person == person)
    ).first()
    return OptOut(**row._mapping) if row is not None else None


def opted_out_people(connection: Connection, bot_number: str) -> list[str]:
    """Everyone opted out of `bot_number` now."""
    return list(connection.scalars(
        select(opt_outs.c.person).where(opt_outs.c.bot_number == bot_number, opt_outs.c.opted_out.is_(True))
    ))


def record_inbound(engine: Engine, message: dict[str, Any], key: str | None = None) -> None:
    """Record an inbound STOP or START (an INBOUND message) under `key` (the bot's opt-out key for
    the number texted; by default that number); ordinary messages change nothing.
    The copy was told by the accept script, in the order the texts arrived: telling it again here
    could undo a later text (this START's removal dropping the STOP that followed it)."""
    if message["event"] == MESSAGE:
        return
    kind = (message.get("opt_out_type") or "").strip().upper()
    how = f"OptOutType {kind}" if kind in ("STOP", "START") else f"keyword {message['body'].strip().upper()}"
    with transaction(engine) as connection:
        record(connection, key or message["to"], message["sender"], message["event"] == OPT_OUT, how[:64],
               at=message["received_at"])


def opt_out(engine: Engine, redis: Any, bot_number: str, person: str, how: str = HOW_21610) -> None:
    """Record that `person` opted out of `bot_number` (e.g. Twilio's 21610), then tell the copy."""
    with transaction(engine) as connection:
        record(connection, bot_number, person, True, how)
    redis.hset(keys.opted_out(bot_number), person, LIVE)


# --- The copy (Redis) ---------------------------------------------------------------------


def is_opted_out(redis: Any, bot_number: str, person: str) -> bool:
    """Whether the Redis copy lists `person` (the database is not asked)."""
    return bool(redis.hexists(keys.opted_out(bot_number), person))


def request_look(pipe: Any, bot_number: str, person: str) -> None:
    """Queue on `pipe` the copy's word on `person`; its result goes to `opted_out_after_look`."""
    pipe.hmget(keys.opted_out(bot_number), [person, LOADED])


def opted_out_after_look(engine: Engine, redis: Any, bot_number: str, person: str, looked: list[str | None]) -> bool:
    """Whether a send to `person` must be suppressed, given what `request_look` returned. The
    database is asked only when the copy is missing or names the person from a rebuild."""
    value, loaded = looked
    if loaded is None:
        load_copy(engine, redis, bot_number)
        value = redis.hget(keys.opted_out(bot_number), person)
    if value is None:
        return False
    if value != FROM_DATABASE:
        return True
    return _confirm(engine, redis, bot_number, person)


# KEYS: the copy. ARGV: the people opted out in the database. HSETNX: what the copy learnt itself wins.
LOAD_LUA = f"""
for i = 1, #ARGV do redis.call('HSETNX', KEYS[1], ARGV[i], '{FROM_DATABASE}') end
redis.call('HSET', KEYS[1], '{LOADED}', '1')
"""

# KEYS: the copy. ARGV: a person. Forget them only if nothing newer (a STOP) has replaced the rebuilt entry.
FORGET_LUA = f"""
if redis.call('HGET', KEYS[1], ARGV[1]) == '{FROM_DATABASE}' then redis.call('HDEL', KEYS[1], ARGV[1]) end
"""


# KEYS: the copies given up, then the bot's copies now. ARGV[1]: how many were given up. What a copy
# given up learnt itself (a STOP perhaps not yet in the database) goes into each of the bot's copies,
# which are rebuilt from the database, now holding the rows carried over, before their next use.
CARRY_OVER_LUA = f"""
local gone = tonumber(ARGV[1])
for i = 1, gone do
  local fields = redis.call('HGETALL', KEYS[i])
  for j = 1, #fields, 2 do
    if fields[j + 1] == '{LIVE}' then
      for k = gone + 1, #KEYS do redis.call('HSET', KEYS[k], fields[j], '{LIVE}') end
    end
  end
end
for k = gone + 1, #KEYS do redis.call('HDEL', KEYS[k], '{LOADED}') end
"""


def carry_over_copies(redis: Any, gone: Collection[str], after: Collection[str]) -> None:
    """The copy's side of `carry_over`, once the database's is committed."""
    if gone:
        copies = [keys.opted_out(key) for key in (*gone, *sorted(after))]
        redis.eval(CARRY_OVER_LUA, len(copies), *copies, len(gone))
# A copy missing is rebuilt by one caller of this process at a time; the others wait for that rebuild.
_LOADS = SingleFlight()


def load_copy(engine: Engine, redis: Any, bot_number: str) -> None:
    """Add the database's opt-outs of `bot_number` to its copy and mark it complete, in one step."""
    _LOADS.run(bot_number, lambda: _load_copy(engine, redis, bot_number))


def _load_copy(engine: Engine, redis: Any, bot_number: str) -> None:
    with engine.connect() as connection:
        people = opted_out_people(connection, bot_number)
    redis.eval(LOAD_LUA, 1, keys.opted_out(bot_number), *people)


def _confirm(engine: Engine, redis: Any, bot_number: str, person: str) -> bool:
    """A rebuilt entry still stands unless the database says the person opted back in (while the
    database is unreachable, it stands: the reply waits in the log as suppressed, never sent wrongly)."""
    try:
        with engine.connect() as connection:
            state = read(connection, bot_number, person)
    except SQLAlchemyError as error:
        log.warning("optout.unconfirmed", reason="the database is unreachable", error=error.__class__.__name__)
        return True
    if state is None or state.opted_out:
        return True
    redis.eval(FORGET_LUA, 1, keys.opted_out(bot_number), person)
    return False
