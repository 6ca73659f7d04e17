"""`mammut-sms migrate --from-redis`: copy the durable data of releases that kept it in Redis.

Reads the Redis layout of the last such release (its key names are spelled out here: the key module
no longer has them), writes each kind in batches of BATCH rows, one short transaction per batch, and
leaves Redis as it was. A row already in the database is left as it is, so running it again, or
after the new release has written rows of its own, copies only what is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Column, Connection, Engine, Table, func, select, text, tuple_

from shared.bots import RegistryCopy
from shared.db import insert, insert_ignoring_duplicates, make_engine, transaction
from shared.messagelog import STATUS_RANK
from shared.redis import connect
from shared.schema import STATUSES, bots, conversations, dead_letters, deliveries, messages, opt_outs
from shared.settings import Settings

T = TypeVar("T")

# Rows per transaction, and keys asked for per SCAN call.
BATCH = 500
SCAN_COUNT = 1000
OPT_OUT_HOW = "migrated from Redis"

# The old layout (shared/keys.py before the system of record).
BOT_KEY = "sms:bot:"  # + id: the bot's JSON record
BOT_NEXT_ID = "sms:bot:next-id"  # the last id handed out, deleted bots' included
OPT_OUT_KEY = "sms:optout:"  # + bot number: the set of people who texted STOP
LOG_KEY, LOG_SUFFIX = "sms:conv:{", "}:log"  # + "<bot id>:<person>": entry ids, oldest first
LOG_ENTRIES_SUFFIX = "}:log-entries"  # the entries (JSON) by id
STATUS_KEY = "sms:status:"  # + MessageSid: hash of status, rank, error-code and at:<status>
DEAD_REPLY_KEY = "sms:dead-reply:"  # + reply id: the reply (JSON) with why it failed

NAMES = {
    "bots": ("bot", "bots"), "opt_outs": ("opt-out", "opt-outs"), "messages": ("message", "messages"),
    "conversations": ("conversation", "conversations"), "deliveries": ("delivery status", "delivery statuses"),
    "dead_letters": ("dead letter", "dead letters"),
}
# Why a row of each kind may be neither copied nor already there.
SKIPPED_BECAUSE = {
    "bots": "whose number another bot in the database has",
    "messages": "whose Twilio sid another message in the database has",
    "deliveries": "of messages no longer in any conversation's log",
}


@dataclass
class Copied:
    """What a copy did, per kind (the table's name): rows written, rows already there, rows left out."""

    copied: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))
    present: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))

    def add(self, kind: str, copied: int, present: int, skipped: int = 0) -> None:
        self.copied[kind] += copied
        self.present[kind] += present
        self.skipped[kind] += skipped

    def summary(self) -> str:
        text = f"copied from Redis: {_phrase(self.copied)}; already in the database: {_phrase(self.present)}"
        left_out = [f"{_count(kind, n)} {SKIPPED_BECAUSE.get(kind, 'that clash with rows in the database')}"
                    for kind, n in self.skipped.items() if n]
        return text + (f"; not copied: {', '.join(left_out)}" if left_out else "")


def _count(kind: str, n: int) -> str:
    one, many = NAMES[kind]
    return f"{n} {one if n == 1 else many}"


def _phrase(counts: dict[str, int]) -> str:
    return (f"{_count('bots', counts['bots'])}, {_count('opt_outs', counts['opt_outs'])}, "
            f"{_count('messages', counts['messages'])} in {_count('conversations', counts['conversations'])} "
            f"({_count('deliveries', counts['deliveries'])}), {_count('dead_letters', counts['dead_letters'])}")


def copy_from_redis(settings: Settings) -> Copied:
    """Copy bots, opt-outs, the message log, delivery statuses and dead letters into the database."""
    assert settings.database_url is not None
    redis = connect(settings.redis_url)
    engine = make_engine(settings.database_url, size=1)
    report = Copied()
    try:
        numbers = _copy_bots(redis, engine, report)
        _copy_opt_outs(redis, engine, report)
        _copy_log(redis, engine, numbers, report)
        _copy_deliveries(redis, engine, report)
        _copy_dead_letters(redis, engine, report)
        _move_bot_ids_past(engine, int(redis.get(BOT_NEXT_ID) or 0))
    finally:
        engine.dispose()
        redis.close()
    return report


# --- reading Redis -----------------------------------------------------------------------------


def _scan(redis: Any, pattern: str) -> Iterator[list[str]]:
    """The keys matching `pattern`, a batch at a time; SCAN may repeat a key, this does not."""
    seen: set[str] = set()

    def first_sight(key: str) -> bool:
        fresh = key not in seen
        seen.add(key)
        return fresh

    return _batches(key for key in redis.scan_iter(match=pattern, count=SCAN_COUNT) if first_sight(key))


def _records(redis: Any, pattern: str) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """The JSON string values at keys matching `pattern`, with their keys, a batch at a time."""
    for chunk in _scan(redis, pattern):
        values = redis.mget(chunk)
        yield [(key, json.loads(raw)) for key, raw in zip(chunk, values) if raw]


def _batches(rows: Iterable[T]) -> Iterator[list[T]]:
    chunk: list[T] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= BATCH:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- writing the database ----------------------------------------------------------------------


def _copy_rows(engine: Engine, table: Table, rows: Sequence[dict[str, Any]]) -> tuple[int, int, int]:
    """Insert the rows whose primary key is new, in one transaction; returns (copied, present, skipped):
    skipped rows clashed with another unique column."""
    key = list(table.primary_key.columns)
    by_key = {tuple(row[column.name] for column in key): row for row in rows}
    with transaction(engine) as connection:
        present = _existing(connection, key, by_key)
        fresh = [row for row_key, row in by_key.items() if row_key not in present]
        insert_ignoring_duplicates(connection, table, fresh)
        copied = _existing(connection, key, [row_key for row_key in by_key if row_key not in present])
    return len(copied), len(present), len(fresh) - len(copied)


def _existing(connection: Connection, key: list[Column[Any]],
              wanted: Iterable[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    wanted = list(wanted)
    if not wanted:
        return set()
    if len(key) == 1:
        where = key[0].in_([row_key[0] for row_key in wanted])
    else:
        where = tuple_(*key).in_(wanted)
    return {tuple(row) for row in connection.execute(select(*key).where(where))}


def _move_bot_ids_past(engine: Engine, next_id: int) -> None:
    """Make the next bot's id larger than every copied one, and than every id the old registry
    handed out (a deleted bot's log may have been copied: a new bot must not inherit it)."""
    with transaction(engine) as connection:
        floor = max(next_id, connection.execute(select(func.coalesce(func.max(bots.c.id), 0))).scalar_one())
        if floor <= 0:
            return
        if connection.dialect.name == "postgresql":
            _raise_postgresql_sequence(connection, floor)
        else:
            _raise_sqlite_sequence(connection, floor)


def _raise_postgresql_sequence(connection: Connection, floor: int) -> None:
    sequence = connection.execute(text("SELECT pg_get_serial_sequence('bots', 'id')")).scalar_one()
    last, called = connection.execute(text(f"SELECT last_value, is_called FROM {sequence}")).one()
    if floor > last or not called:  # never backwards: ids handed out since stay taken
        connection.execute(text("SELECT setval(:sequence, :floor)"), {"sequence": sequence, "floor": floor})


def _raise_sqlite_sequence(connection: Connection, floor: int) -> None:
    # AUTOINCREMENT follows the largest id inserted by itself; a deleted bot's id needs saying.
    if not connection.execute(text("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'")).first():
        return  # bots without AUTOINCREMENT: SQLite gives the largest id + 1
    connection.execute(text("INSERT INTO sqlite_sequence (name, seq) SELECT 'bots', 0 "
                            "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'bots')"))
    connection.execute(text("UPDATE sqlite_sequence SET seq = :floor WHERE name = 'bots' AND seq < :floor"),
                       {"floor": floor})


# --- each kind ---------------------------------------------------------------------------------


def _copy_bots(redis: Any, engine: Engine, report: Copied) -> dict[int, str]:
    """Copy every bot with its id; returns their numbers by id."""
    numbers: dict[int, str] = {}
    for chunk in _records(redis, BOT_KEY + "[0-9]*"):
        rows = [_bot_row(record) for key, record in chunk if key[len(BOT_KEY):].isdigit()]
        numbers.update((row["id"], row["main_phone_number"]) for row in rows)
        report.add("bots", *_copy_rows(engine, bots, rows))
    RegistryCopy(redis).forget()  # rebuilt from the database, copied bots included, when next read
    return numbers


def _bot_row(record: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {
        "id": int(record["id"]),
        "name": record.get("name") or "",
        "account_sid": record["twilio-account-sid"],
        "auth_token_encrypted": record["twilio-auth-token-encrypted"],  # Fernet: copied as it is
        "main_phone_number": record["main-phone-number"],
        "engine_url": record.get("engine-url"),
        "messages_per_second": float(record.get("messages-per-second") or 1.0),
        "fallback_message": record.get("fallback-message"),
        "extra": record.get("extra") or {},
        "created_at": float(record.get("created-at") or now),
        "updated_at": float(record.get("updated-at") or now),
    }


def _copy_opt_outs(redis: Any, engine: Engine, report: Copied) -> None:
    now = time.time()
    for chunk in _scan(redis, OPT_OUT_KEY + "*"):
        rows = ({"bot_number": key[len(OPT_OUT_KEY):], "person": person, "opted_out": True, "how": OPT_OUT_HOW,
                 "at": now} for key in chunk for person in redis.sscan_iter(key, count=SCAN_COUNT))
        for batch in _batches(rows):
            report.add("opt_outs", *_copy_rows(engine, opt_outs, batch))


def _copy_log(redis: Any, engine: Engine, numbers: dict[int, str], report: Copied) -> None:
    """Copy each conversation's log into `messages`, and its last entry into `conversations`."""
    for chunk in _scan(redis, LOG_KEY + "*" + LOG_SUFFIX):
        pipe = redis.pipeline(transaction=False)
        for key in chunk:
            pipe.lrange(key, 0, -1)
        logs = pipe.execute()
        pipe = redis.pipeline(transaction=False)
        for key, ids in zip(chunk, logs):  # a log gone since the SCAN reads as no entries
            pipe.hmget(key[:-len(LOG_SUFFIX)] + LOG_ENTRIES_SUFFIX, ids or ["-"])
        rows: list[dict[str, Any]] = []
        last: list[dict[str, Any]] = []
        for key, raw_entries in zip(chunk, pipe.execute()):
            bot_id, person = key[len(LOG_KEY):-len(LOG_SUFFIX)].split(":", 1)
            logged = [_message_row(int(bot_id), person, numbers.get(int(bot_id)), json.loads(raw))
                      for raw in raw_entries if raw]
            rows += logged
            last += [_conversation_row(logged[-1])] if logged else []
        for batch in _batches(rows):
            report.add("messages", *_copy_rows(engine, messages, batch))
        for batch in _batches(last):
            report.add("conversations", *_copy_conversations(engine, batch))


def _message_row(bot_id: int, person: str, bot_number: str | None, entry: dict[str, Any]) -> dict[str, Any]:
    at = float(entry["at"])
    return {
        "id": entry["id"],
        "bot_id": bot_id,
        "person": person,
        "bot_number": bot_number,
        "direction": entry["direction"],
        "origin": "person" if entry["direction"] == "in" else "engine",
        "text": entry.get("text") or "",
        "media": entry.get("media") or [],
        "sid": entry.get("sid"),
        "in_reply_to": None,  # the old log did not keep it
        "status": entry.get("status") or "pending",
        "error_code": entry.get("error-code"),
        "at": at,
        "updated_at": max([at, *map(float, (entry.get("statuses") or {}).values())]),
    }


def _conversation_row(message: dict[str, Any]) -> dict[str, Any]:
    return {"bot_id": message["bot_id"], "person": message["person"], "last_message_id": message["id"],
            "last_at": message["at"]}


def _copy_conversations(engine: Engine, rows: list[dict[str, Any]]) -> tuple[int, int]:
    """Add the conversations not there yet; one already there takes the copied last message only if
    that is newer (the old release may have logged more since an earlier copy)."""
    keys = [(row["bot_id"], row["person"]) for row in rows]
    with transaction(engine) as connection:
        present = _existing(connection, [conversations.c.bot_id, conversations.c.person], keys)
        statement = insert(connection, conversations)
        connection.execute(statement.on_conflict_do_update(
            index_elements=[conversations.c.bot_id, conversations.c.person],
            set_={"last_message_id": statement.excluded.last_message_id, "last_at": statement.excluded.last_at},
            where=conversations.c.last_at < statement.excluded.last_at,
        ), rows)
    return len(set(keys) - present), len(present)


def _copy_deliveries(redis: Any, engine: Engine, report: Copied) -> None:
    """Copy each MessageSid's delivery status; its bot is the one whose copied message has that sid."""
    for chunk in _scan(redis, STATUS_KEY + "*"):
        pipe = redis.pipeline(transaction=False)
        for key in chunk:
            pipe.hgetall(key)
        statuses = {key[len(STATUS_KEY):]: fields for key, fields in zip(chunk, pipe.execute()) if fields}
        with engine.connect() as connection:
            bot_ids = dict(connection.execute(
                select(messages.c.sid, messages.c.bot_id).where(messages.c.sid.in_(list(statuses)))).all())
        rows = [_delivery_row(sid, bot_ids[sid], fields) for sid, fields in statuses.items() if sid in bot_ids]
        report.add("deliveries", *_copy_rows(engine, deliveries, rows))
        report.add("deliveries", 0, 0, len(statuses) - len(rows))


def _delivery_row(sid: str, bot_id: int, fields: dict[str, str]) -> dict[str, Any]:
    times = {name[3:]: float(value) for name, value in fields.items() if name.startswith("at:")}
    status = fields.get("status") or max(times, key=times.__getitem__, default="queued")
    return {
        "sid": sid,
        "bot_id": bot_id,
        "status": status,
        "rank": STATUS_RANK.get(status, int(fields.get("rank") or 0)),
        "error_code": int(fields["error-code"]) if fields.get("error-code") else None,
        "updated_at": max(times.values(), default=time.time()),
        **{f"{name}_at": at for name, at in times.items() if name in STATUSES},
    }


def _copy_dead_letters(redis: Any, engine: Engine, report: Copied) -> None:
    for chunk in _records(redis, DEAD_REPLY_KEY + "*"):
        rows = [_dead_letter_row(key[len(DEAD_REPLY_KEY):], reply) for key, reply in chunk]
        report.add("dead_letters", *_copy_rows(engine, dead_letters, rows))


def _dead_letter_row(reply_id: str, reply: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": reply.get("id") or reply_id,
        "bot_id": int(reply["bot_id"]),
        "person": reply["to"],
        "text": reply.get("text") or "",
        "media_url": reply.get("media_url"),
        "error_code": reply.get("error_code"),
        "http_status": reply.get("http_status"),
        "error": reply.get("error"),
        "reason": reply.get("reason") or "permanent",
        "attempts": int(reply.get("attempts") or 0),
        "failed_at": float(reply.get("failed_at") or reply.get("created_at") or time.time()),
    }
