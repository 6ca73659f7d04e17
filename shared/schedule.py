"""Messages that go later: those asked for a time (`send_at`) and those held through the
recipient's quiet hours. The database's `scheduled` table is their record; a worker queues each
on its conversation when it is due (worker.scheduler), so Redis holds only what is due now.

Quiet hours hold what the person did not just ask for (an engine's push, an operator's send, a
scheduled send); replies to a text of theirs are never held. They are read in the bot's
`quiet-hours-time-zone`, else in the recipient's own zone as libphonenumber knows it from the
number, else (a number spanning several zones) in the zone of the bot's number, else in UTC.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as number_zones
from sqlalchemy import Connection, func, select, update

from shared.bots import Bot
from shared.db import insert
from shared.schema import scheduled

SEND_AT, QUIET = "send-at", "quiet-hours"
WAITING, QUEUED, CANCELLED, OPTED_OUT, HANDED_OFF, OUTSIDE_PUSH_WINDOW, BOT_GONE = (
    "waiting", "queued", "cancelled", "opted-out", "handed-off", "outside-window", "bot-gone")
STATES = (WAITING, QUEUED, CANCELLED, OPTED_OUT, HANDED_OFF, OUTSIDE_PUSH_WINDOW, BOT_GONE)
MAX_AHEAD_SECONDS = 30 * 86400
_WINDOW = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])")
UTC = ZoneInfo("UTC")


# --- Quiet hours ------------------------------------------------------------------------------

def quiet_window(text: str | None) -> tuple[int, int] | None:
    """"21:00-08:00" as (start, end) minutes of the day; None when malformed or empty."""
    match = _WINDOW.fullmatch(text or "")
    if match is None:
        return None
    start, end = int(match[1]) * 60 + int(match[2]), int(match[3]) * 60 + int(match[4])
    return (start, end) if start != end else None


@lru_cache(maxsize=512)
def zone(name: str | None) -> ZoneInfo | None:
    try:
        return ZoneInfo(name) if name else None
    except (ZoneInfoNotFoundError, ValueError):
        return None


@lru_cache(maxsize=65536)
def number_zone(number: str | None) -> ZoneInfo | None:
    """The one time zone libphonenumber gives the number (by country and area code); None when it
    knows none or several."""
    try:
        names = number_zones.time_zones_for_number(phonenumbers.parse(number or ""))
    except phonenumbers.NumberParseException:
        return None
    return zone(names[0]) if len(names) == 1 and names[0] != "Etc/Unknown" else None


def recipient_zone(bot: Bot, person: str) -> ZoneInfo:
    return zone(bot.hours.time_zone) or number_zone(person) or number_zone(bot.number) or UTC


def quiet_until(bot: Bot, person: str, now: float | None = None) -> float | None:
    """When the recipient's quiet hours end, if they are in them at `now`; None when they are not."""
    window = quiet_window(bot.hours.quiet_hours)
    if window is None:
        return None
    tz = recipient_zone(bot, person)
    local = datetime.fromtimestamp(time.time() if now is None else now, tz)
    minute = local.hour * 60 + local.minute
    start, end = window
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if not inside:
        return None
    ends = datetime(local.year, local.month, local.day, end // 60, end % 60, tzinfo=tz)
    if ends <= local:
        ends = datetime.combine(local.date() + timedelta(days=1), ends.timetz())
    return ends.timestamp()


# --- The record ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scheduled:
    id: str
    bot_id: int
    person: str
    text: str
    media_url: str | None
    origin: str
    reason: str
    send_at: float
    state: str
    created_at: float
    done_at: float | None

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "to": self.person, "text": self.text, "media-url": self.media_url,
                "origin": self.origin, "reason": self.reason, "send-at": self.send_at, "state": self.state,
                "created-at": self.created_at, "done-at": self.done_at}


def add(connection: Connection, bot_id: int, person: str, text: str, media_url: str | None, origin: str,
        send_at: float, reason: str) -> str:
    """Keep a message for `send_at`; returns its id."""
    scheduled_id = uuid.uuid4().hex
    connection.execute(insert(connection, scheduled).values(
        id=scheduled_id, bot_id=bot_id, person=person, text=text, media_url=media_url, origin=origin, reason=reason,
        send_at=send_at, state=WAITING, created_at=time.time()))
    return scheduled_id


def of_bot(connection: Connection, bot_id: int, state: str | None = None, limit: int = 100) -> list[Scheduled]:
    """The bot's scheduled messages, soonest first (those in `state` only, if given)."""
    query = select(*_COLUMNS).where(scheduled.c.bot_id == bot_id)
    if state:
        query = query.where(scheduled.c.state == state)
    rows = connection.execute(query.order_by(scheduled.c.send_at, scheduled.c.seq).limit(limit))
    return [Scheduled(**row._mapping) for row in rows]


def due(connection: Connection, now: float, limit: int = 100) -> list[Scheduled]:
    """What is due, in the order it must go: by time, then as it came."""
    query = select(*_COLUMNS).where(scheduled.c.state == WAITING, scheduled.c.send_at <= now).order_by(
        scheduled.c.send_at, scheduled.c.seq).limit(limit)
    return [Scheduled(**row._mapping) for row in connection.execute(query)]


def finish(connection: Connection, scheduled_id: str, state: str, bot_id: int | None = None) -> bool:
    """Move a waiting message to `state` (queued, cancelled, ...); False when it was no longer waiting,
    so one caller only (a worker, or a DELETE) ever takes it."""
    condition = (scheduled.c.id == scheduled_id) & (scheduled.c.state == WAITING)
    if bot_id is not None:
        condition &= scheduled.c.bot_id == bot_id
    return connection.execute(update(scheduled).where(condition).values(state=state, done_at=time.time())).rowcount == 1


def hold(connection: Connection, scheduled_id: str, until: float) -> None:
    """Due inside the recipient's quiet hours: wait on until they end."""
    connection.execute(update(scheduled).where(scheduled.c.id == scheduled_id).values(send_at=until, reason=QUIET))


def read(connection: Connection, bot_id: int, scheduled_id: str) -> Scheduled | None:
    row = connection.execute(select(*_COLUMNS).where(scheduled.c.id == scheduled_id,
                                                     scheduled.c.bot_id == bot_id)).first()
    return Scheduled(**row._mapping) if row is not None else None


def waiting_counts(connection: Connection) -> dict[str, int]:
    """How many messages wait, by reason."""
    rows = connection.execute(select(scheduled.c.reason, func.count()).where(
        scheduled.c.state == WAITING).group_by(scheduled.c.reason))
    return {SEND_AT: 0, QUIET: 0, **{reason: int(count) for reason, count in rows}}


_COLUMNS = [column for column in scheduled.c if column.name != "seq"]


def later(bot: Bot, person: str, send_at: float | None = None, now: float | None = None) -> tuple[float, str] | None:
    """When a message the person did not just ask for must wait, and why: its send_at, or the end of
    their quiet hours; None when it goes now. Quiet hours are looked at again when a send_at comes."""
    now = time.time() if now is None else now
    if send_at is not None and send_at > now:
        return send_at, SEND_AT
    until = quiet_until(bot, person, now)
    return (until, QUIET) if until is not None else None
