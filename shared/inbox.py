"""What the console reads across an operator's bots: the inbox (conversations with filters and a
search) and the overview's last-24-hours figures. The REST API reads one bot at a time
(shared.messagelog); these read several, for a person's screen.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, exists, func, or_, select

from shared import messagelog
from shared.schema import conversations, dead_letters, deliveries, handoffs, messages, opt_outs

PAUSED, FAILED, OPTED_OUT = "paused", "failed", "opted-out"
FILTERS = (PAUSED, FAILED, OPTED_OUT)
FAILED_STATUSES = ("failed", "undelivered")
DAY = 24 * 3600
INBOX_LIMIT = 100


@dataclass(frozen=True)
class BotScope:
    """A bot the reader may see, with the key its opt-outs are kept under (shared.bots.Bot.opt_out_key)."""

    bot_id: int
    opt_out_key: str


def conversations_of(connection: Connection, bots: Sequence[BotScope], only: str | None = None,
                     search: str = "", limit: int = INBOX_LIMIT, now: float | None = None) -> list[dict[str, Any]]:
    """The bots' conversations, latest activity first: each with its bot, person, last message,
    whether a human has it, whether a reply to it failed, and whether the person opted out."""
    now = time.time() if now is None else now
    found: list[dict[str, Any]] = []
    for bot in bots:
        found.extend(_of_bot(connection, bot, only, search.strip(), limit, now))
    return sorted(found, key=lambda item: item["last_at"], reverse=True)[:limit]


def _of_bot(connection: Connection, bot: BotScope, only: str | None, search: str, limit: int,
            now: float) -> list[dict[str, Any]]:
    c, m, h = conversations.c, messages.c, handoffs.c
    mine = and_(m.bot_id == c.bot_id, m.person == c.person)
    failed = exists().where(mine, m.direction == "out", or_(
        m.status == messagelog.FAILED,
        exists().where(deliveries.c.sid == m.sid, deliveries.c.status.in_(FAILED_STATUSES))))
    paused = exists().where(h.bot_id == c.bot_id, h.person == c.person, or_(h.until.is_(None), h.until > now))
    last = messages.alias("last")
    query = (select(c.person, c.last_at, last.c.text, last.c.direction, opt_outs.c.opted_out,
                    failed.label("failed"), paused.label("paused"))
             .select_from(conversations.outerjoin(last, last.c.id == c.last_message_id)
                          .outerjoin(opt_outs, and_(opt_outs.c.bot_number == bot.opt_out_key,
                                                    opt_outs.c.person == c.person)))
             .where(c.bot_id == bot.bot_id))
    if only == PAUSED:
        query = query.where(paused)
    elif only == FAILED:
        query = query.where(failed)
    elif only == OPTED_OUT:
        query = query.where(opt_outs.c.opted_out.is_(True))
    if search:
        needle = f"%{_escaped(search.lower())}%"
        query = query.where(or_(c.person.like(needle, escape="\\"),
                                exists().where(mine, func.lower(m.text).like(needle, escape="\\"))))
    rows = connection.execute(query.order_by(c.last_at.desc()).limit(limit)).all()
    return [{"bot_id": bot.bot_id, "person": row.person, "last_at": row.last_at, "text": row.text or "",
             "direction": row.direction, "opted_out": bool(row.opted_out), "failed": bool(row.failed),
             "paused": bool(row.paused)} for row in rows]


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def last_day(connection: Connection, bot_ids: Sequence[int], now: float | None = None) -> dict[int, dict[str, Any]]:
    """Per bot, over the last 24 hours: messages in and out, replies delivered and failed (and the
    delivery rate of those settled), replies still waiting to go, and dead letters."""
    since = (time.time() if now is None else now) - DAY
    m = messages.c
    figures = {bot_id: {"in": 0, "out": 0, "delivered": 0, "failed": 0, "waiting": 0, "dead_letters": 0,
                        "delivery_rate": None} for bot_id in bot_ids}
    if not bot_ids:
        return figures
    settled = func.coalesce(deliveries.c.status, m.status)
    rows = connection.execute(
        select(m.bot_id, m.direction, settled.label("status"), func.count().label("n"))
        .select_from(messages.outerjoin(deliveries, deliveries.c.sid == m.sid))
        .where(m.bot_id.in_(bot_ids), m.at >= since).group_by(m.bot_id, m.direction, settled)).all()
    for row in rows:
        bot = figures[row.bot_id]
        bot["in" if row.direction == "in" else "out"] += row.n
        if row.direction == "out":
            if row.status in ("delivered", "read"):
                bot["delivered"] += row.n
            elif row.status in (*FAILED_STATUSES, messagelog.FAILED):
                bot["failed"] += row.n
            elif row.status == messagelog.PENDING:
                bot["waiting"] += row.n
    dead = connection.execute(select(dead_letters.c.bot_id, func.count()).where(
        dead_letters.c.bot_id.in_(bot_ids), dead_letters.c.failed_at >= since).group_by(dead_letters.c.bot_id)).all()
    for bot_id, count in dead:
        figures[bot_id]["dead_letters"] = count
    for bot in figures.values():
        if bot["delivered"] + bot["failed"]:
            bot["delivery_rate"] = bot["delivered"] / (bot["delivered"] + bot["failed"])
    return figures
