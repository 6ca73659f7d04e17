"""The message log: every inbound and outbound message (`messages`), what Twilio said of each sent
one (`deliveries`), and the latest message of each conversation (`conversations`).

A reply's row is written before it joins its outbox, and updated with Twilio's MessageSid before it
leaves it; status callbacks land in `deliveries` by MessageSid, whether or not the worker's write
came first. Reading merges the two, and a status never moves backwards.

Pages are keyset pages: `next` is an opaque cursor naming the last item of a page; passed back as
`after`, it gives the items that follow it in the same order.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Select, and_, bindparam, case, func, select, tuple_, update

from shared.db import built
from shared.schema import STATUSES, conversations, deliveries, messages, opt_outs

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000

# Twilio's lifecycle; callbacks arrive out of order, and a status never moves backwards.
STATUS_RANK = {
    "pending": 0, "accepted": 0, "scheduled": 0, "queued": 1, "sending": 2, "sent": 3,
    "failed": 4, "undelivered": 4, "delivered": 4, "canceled": 4, "read": 5,
}
assert set(STATUSES) <= STATUS_RANK.keys()

RECEIVED, PENDING, SUPPRESSED, FAILED = "received", "pending", "suppressed", "failed"
PERSON, ENGINE, CALLBACK, REPLAY, OPERATOR = "person", "engine", "callback", "replay", "operator"
# The log outbox's record of replies that answer no inbound (worker.logdrain writes it).
PUSHED = "replies"
# What the log keeps of a reply on its way through the log outbox.
LOGGED_REPLY_FIELDS = ("id", "bot_id", "to", "text", "media_url", "in_reply_to", "created_at")

_DELIVERY = [deliveries.c.status.label("delivery_status"), deliveries.c.error_code.label("delivery_error_code"),
             *(deliveries.c[f"{status}_at"].label(f"delivery_{status}_at") for status in STATUSES)]


class BadCursor(ValueError):
    """An `after` value that no page of ours handed out."""


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None  # the cursor of the last item, when more follow


# --- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """An inbound message (as INBOUND) and the replies its engine gave (as REPLY)."""

    message: Mapping[str, Any]
    replies: Sequence[Mapping[str, Any]]
    bot_number: str | None


def record_exchange(connection: Connection, message: Mapping[str, Any], replies: Sequence[Mapping[str, Any]],
                    bot_number: str | None) -> None:
    """An inbound message and the replies it got, with the conversation's latest; see record_exchanges."""
    record_exchanges(connection, [Exchange(message, replies, bot_number)])


def record_exchanges(connection: Connection, exchanges: Sequence[Exchange]) -> None:
    """Inbound messages and the replies they got, with each conversation's latest: one statement per
    table whatever their number, and the caller's transaction makes it all or nothing. A message
    handled again (its worker died before queuing the replies) rewrites the same reply rows and
    drops those the new answer no longer has."""
    if not exchanges:
        return
    now = time.time()
    inbound: dict[str, dict[str, Any]] = {}
    replies: dict[str, dict[str, Any]] = {}
    latest: dict[tuple[int, str], tuple[float, str]] = {}
    for exchange in exchanges:
        message = exchange.message
        row = inbound.setdefault(message["sid"], _inbound_row(message, now))
        rows = _reply_rows(exchange.replies, exchange.bot_number, ENGINE, after=row["at"])
        replies.update((reply["id"], reply) for reply in rows)
        last = rows[-1] if rows else row
        key = (row["bot_id"], row["person"])
        latest[key] = max(latest.get(key, (last["at"], last["id"])), (last["at"], last["id"]))
    fresh = {row.id for row in connection.execute(built(connection, "log:inbound", lambda insert: (
        insert(messages).on_conflict_do_nothing().returning(messages.c.id))), list(inbound.values()))}
    for sid in inbound.keys() - fresh:  # seen before: an earlier attempt's replies may linger
        _forget_stale_replies(connection, inbound[sid], [reply["id"] for reply in replies.values()
                                                         if reply["in_reply_to"] == sid])
    _upsert_replies(connection, list(replies.values()))
    _touch_conversations(connection, latest)


def _inbound_row(message: Mapping[str, Any], now: float) -> dict[str, Any]:
    return {
        "id": message["sid"], "bot_id": message["bot_id"], "person": message["sender"], "bot_number": message["to"],
        "direction": "in", "origin": PERSON, "text": message["body"], "media": list(message["media"]),
        "sid": message["sid"], "in_reply_to": None, "status": RECEIVED, "error_code": None,
        "at": message["received_at"], "updated_at": now,
    }


def record_replies(connection: Connection, replies: Sequence[Mapping[str, Any]], bot_number: str | None,
                   origin: str = CALLBACK) -> None:
    """Replies that answer no inbound in this step (an engine's callback, a replay), as `pending`."""
    rows = _reply_rows(replies, bot_number, origin)
    _upsert_replies(connection, rows)
    _touch_conversations(connection, {(row["bot_id"], row["person"]): (row["at"], row["id"]) for row in rows})


def replies_record(replies: Sequence[Mapping[str, Any]], bot_number: str | None, origin: str = CALLBACK) -> str:
    """Replies that answer no inbound (record_replies' input), as a record for the log outbox
    (worker.logdrain), so they reach the database only once Redis has queued them."""
    return json.dumps({"kind": PUSHED, "replies": [{name: reply.get(name) for name in LOGGED_REPLY_FIELDS}
                                                   for reply in replies],
                       "bot_number": bot_number, "origin": origin}, separators=(",", ":"))


@dataclass(frozen=True)
class Outcome:
    """How a reply's journey ended: sent (with Twilio's MessageSid and status), suppressed or failed."""

    reply_id: str
    status: str
    sid: str | None = None
    error_code: int | None = None
    at: float = field(default_factory=time.time)


def record_sent(connection: Connection, reply_id: str, sid: str, status: str,
                at: float | None = None) -> None:
    """Twilio took the reply: its row gets the MessageSid and status."""
    record_outcomes(connection, [Outcome(reply_id, status, sid=sid, at=time.time() if at is None else at)])


def record_outcome(connection: Connection, reply_id: str, status: str, error_code: int | None = None,
                   at: float | None = None) -> None:
    """A reply that ends without a MessageSid: suppressed, or failed (with Twilio's error code)."""
    record_outcomes(connection, [Outcome(reply_id, status, error_code=error_code,
                                         at=time.time() if at is None else at)])


def record_outcomes(connection: Connection, outcomes: Sequence[Outcome]) -> None:
    """Each reply's row gets its outcome, in one statement whatever their number. A sent row's own
    status and time read like a delivery's (see entry): Twilio's later statuses arrive by
    callback, in `deliveries`."""
    if not outcomes:
        return
    m = messages.c
    connection.execute(built(connection, "log:outcome", lambda insert: (
        update(messages).where(m.id == bindparam("reply_id")).values(
            status=bindparam("new_status"), sid=func.coalesce(bindparam("new_sid"), m.sid),
            error_code=func.coalesce(bindparam("new_error_code"), m.error_code), updated_at=bindparam("new_at")))),
        [{"reply_id": outcome.reply_id, "new_status": outcome.status, "new_sid": outcome.sid,
          "new_error_code": outcome.error_code, "new_at": outcome.at} for outcome in outcomes])


def record_delivery(connection: Connection, sid: str, bot_id: int, status: str, error_code: int | None = None,
                    at: float | None = None) -> str:
    """Record one of Twilio's statuses for a MessageSid; returns the status now current. The time
    of each status is its first report's; the current status only moves forwards."""
    if status not in STATUSES:
        raise ValueError(f"not a Twilio message status: {status!r}")
    at = time.time() if at is None else at
    stamp = f"{status}_at"

    def upsert(insert: Any) -> Any:
        statement = insert(deliveries)
        new, old = statement.excluded, deliveries.c
        forwards = new.rank >= old.rank
        return statement.on_conflict_do_update(index_elements=[old.sid], set_={
            "status": case((forwards, new.status), else_=old.status),
            "rank": case((forwards, new.rank), else_=old.rank),
            stamp: func.coalesce(old[stamp], new[stamp]),
            "error_code": func.coalesce(new.error_code, old.error_code),
            "updated_at": new.updated_at,
        }).returning(old.status)

    return connection.execute(built(connection, f"log:delivery:{status}", upsert), {
        "sid": sid, "bot_id": bot_id, "status": status, "rank": STATUS_RANK[status], "error_code": error_code,
        "updated_at": at, stamp: at}).scalar_one()


def sender_of(connection: Connection, sid: str) -> int | None:
    """The bot that sent the message `sid`: the worker's own record first, else the first callback's."""
    sent = select(messages.c.bot_id).where(messages.c.sid == sid).scalar_subquery()
    reported = select(deliveries.c.bot_id).where(deliveries.c.sid == sid).scalar_subquery()
    return connection.execute(select(func.coalesce(sent, reported))).scalar()


def people_who_wrote(connection: Connection, bot_id: int, people: Sequence[str], since: float) -> set[str]:
    """Of `people`, those who texted the bot since `since`."""
    m = messages.c
    return set(connection.execute(select(m.person).where(
        m.bot_id == bot_id, m.person.in_(list(people)), m.direction == "in", m.at >= since).distinct()).scalars())


def known_sids(connection: Connection, sids: Sequence[str]) -> set[str]:
    """Of these MessageSids, those the log already gives to a message."""
    return set(connection.execute(select(messages.c.sid).where(messages.c.sid.in_(list(sids)))).scalars())


def _reply_rows(replies: Sequence[Mapping[str, Any]], bot_number: str | None, origin: str,
                after: float | None = None) -> list[dict[str, Any]]:
    now, rows = time.time(), []
    for reply in replies:
        # Strictly after the previous row: the log's order is (at, id), and ids need not sort.
        at = reply["created_at"] if after is None else max(reply["created_at"], after + 1e-6)
        media = [{"url": reply["media_url"], "content_type": None}] if reply.get("media_url") else []
        rows.append({
            "id": reply["id"], "bot_id": reply["bot_id"], "person": reply["to"], "bot_number": bot_number,
            "direction": "out", "origin": origin, "text": reply["text"], "media": media, "sid": None,
            "in_reply_to": reply.get("in_reply_to"), "status": PENDING, "error_code": None, "at": at,
            "updated_at": now,
        })
        after = at
    return rows


def _upsert_replies(connection: Connection, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return

    def upsert(insert: Any) -> Any:
        statement = insert(messages)
        new = statement.excluded
        # Only a reply still pending is rewritten: one that went out keeps what was sent.
        return statement.on_conflict_do_update(
            index_elements=[messages.c.id], where=messages.c.status == PENDING,
            set_={"text": new.text, "media": new.media, "at": new.at, "updated_at": new.updated_at})

    connection.execute(built(connection, "log:replies", upsert), rows)


def _forget_stale_replies(connection: Connection, inbound: dict[str, Any], keep: list[str]) -> None:
    """The pending replies of an earlier attempt at this inbound that this attempt did not give."""
    m = messages.c
    statement = messages.delete().where(
        m.bot_id == inbound["bot_id"], m.person == inbound["person"], m.at >= inbound["at"],  # the index
        m.in_reply_to == inbound["id"], m.status == PENDING, m.direction == "out")
    if keep:
        statement = statement.where(m.id.not_in(keep))
    connection.execute(statement)


def _touch_conversations(connection: Connection, latest: Mapping[tuple[int, str], tuple[float, str]]) -> None:
    """Each conversation's latest message, unless a later one is there already (one row per key:
    an upsert may not touch a row twice)."""
    if not latest:
        return

    def upsert(insert: Any) -> Any:
        statement = insert(conversations)
        new, old = statement.excluded, conversations.c
        return statement.on_conflict_do_update(
            index_elements=[old.bot_id, old.person], where=new.last_at >= old.last_at,
            set_={"last_message_id": new.last_message_id, "last_at": new.last_at})

    connection.execute(built(connection, "log:conversation", upsert), [
        {"bot_id": bot_id, "person": person, "last_message_id": message_id, "last_at": at}
        for (bot_id, person), (at, message_id) in latest.items()])


# --- reading ---------------------------------------------------------------------------------


def read(connection: Connection, bot_id: int, person: str, limit: int = DEFAULT_LIMIT, newest_first: bool = False,
         after: str | None = None) -> Page:
    """One page of a bot's messages with one person, each outbound merged with its delivery."""
    m = messages.c
    query = (select(messages, *_DELIVERY).select_from(messages.outerjoin(deliveries, deliveries.c.sid == m.sid))
             .where(m.bot_id == bot_id, m.person == person))
    rows = _page(connection, query, (m.at, m.id), limit, newest_first, after)
    items = [entry(row) for row in rows[:limit]]
    return Page(items, _cursor(rows, limit, lambda row: [row.at, row.id]))


def conversations_of(connection: Connection, bot_id: int, bot_number: str, limit: int = DEFAULT_LIMIT,
                     newest_first: bool = True, after: str | None = None) -> Page:
    """One page of the people a bot has talked to, with each one's latest message and opt-out state."""
    c, m = conversations.c, messages.c
    joined = (conversations.outerjoin(messages, m.id == c.last_message_id)
              .outerjoin(deliveries, deliveries.c.sid == m.sid)
              .outerjoin(opt_outs, and_(opt_outs.c.bot_number == bot_number, opt_outs.c.person == c.person)))
    query = (select(messages, *_DELIVERY, c.person.label("conversation_person"), c.last_at,
                    opt_outs.c.opted_out).select_from(joined).where(c.bot_id == bot_id))
    rows = _page(connection, query, (c.last_at, c.person), limit, newest_first, after)
    items = [{"person": row.conversation_person, "last-message": entry(row) if row.id is not None else None,
              "opted-out": bool(row.opted_out)} for row in rows[:limit]]
    return Page(items, _cursor(rows, limit, lambda row: [row.last_at, row.conversation_person]))


def _page(connection: Connection, query: Select[Any], key: tuple[Any, Any], limit: int, newest_first: bool,
          after: str | None) -> list[Any]:
    """Up to limit + 1 rows (the extra one says whether a next page exists) after the cursor."""
    if after is not None:
        position = tuple_(*key)
        query = query.where(position < tuple_(*_decode(after)) if newest_first else position > tuple_(*_decode(after)))
    order = [column.desc() for column in key] if newest_first else list(key)
    return list(connection.execute(query.order_by(*order).limit(limit + 1)).all())


def _cursor(rows: list[Any], limit: int, position: Any) -> str | None:
    if len(rows) <= limit:
        return None
    raw = json.dumps(position(rows[limit - 1]), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> tuple[float, str]:
    try:
        at, key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, TypeError):
        raise BadCursor(f"not a cursor this API handed out: {cursor!r}") from None
    if not isinstance(at, (int, float)) or not isinstance(key, str):
        raise BadCursor(f"not a cursor this API handed out: {cursor!r}")
    return float(at), key


def entry(row: Any) -> dict[str, Any]:
    """A message as the API shows it: an outbound one with its delivery's status, error and times."""
    statuses = {PENDING if row.direction == "out" else row.status: row.at}
    statuses.setdefault(row.status, row.updated_at)
    for status in STATUSES:
        stamp = getattr(row, f"delivery_{status}_at")
        if stamp is not None:
            statuses.setdefault(status, stamp)
    status = row.status
    if row.delivery_status and STATUS_RANK[row.delivery_status] >= STATUS_RANK.get(status, 0):
        status = row.delivery_status
    code = row.delivery_error_code if row.delivery_error_code is not None else row.error_code
    return {
        "id": row.id, "direction": row.direction, "origin": row.origin, "text": row.text, "media": row.media or [],
        "sid": row.sid, "status": status, "error-code": code,
        "statuses": dict(sorted(statuses.items(), key=lambda item: item[1])), "at": row.at,
    }


def sent_reply(connection: Connection, bot_id: int, reply_id: str) -> dict[str, Any] | None:
    """What the log keeps of a reply the bot sent: enough to send it again."""
    row = connection.execute(select(messages).where(
        messages.c.id == reply_id, messages.c.bot_id == bot_id, messages.c.direction == "out")).first()
    if row is None:
        return None
    media = row.media or []
    return {"person": row.person, "text": row.text, "media_url": media[0]["url"] if media else None,
            "in_reply_to": row.in_reply_to, "bot_number": row.bot_number, "origin": row.origin}
