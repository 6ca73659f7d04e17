"""`mammut-sms migrate` (the release phase): copy the durable data of releases that kept it in Redis.

Reads the Redis layout of the last such release (its key names are spelled out here: the key module
no longer has them) and writes each kind in batches of BATCH rows, one short transaction per batch.
The release phase runs it (`mammut-sms migrate`) while the old layout is there and not yet copied, so
the new processes start with every bot in place. Before writing anything it checks that every bot's
token decrypts with CREDENTIALS_KEY and that no bot in the database is another bot under the same
id or number. A row already in the database is left as it is; once a copy completes, MIGRATED_KEY
says so and no later run copies anything (what the new release deleted since stays deleted).
Besides rows, it carries the old release's dedupe marks over to the new keys (Twilio's retries of
texts it accepted stay duplicates) and takes the dead letters it copied off Dramatiq's queue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import dramatiq
from sqlalchemy import Column, Connection, Engine, Table, func, select, text, tuple_

from shared import keys
from shared.bots import RegistryCopy
from shared.conversations import LegacyMarks
from shared.crypto import Vault
from shared.db import insert, insert_ignoring_duplicates, make_engine, transaction
from shared.messagelog import STATUS_RANK
from shared.netguard import AddressPolicy, RefusedAddress
from shared.optout import OPT_OUT, classify
from shared.redis import connect
from shared.schema import STATUSES, bot_numbers, bots, conversations, dead_letters, deliveries, messages, opt_outs
from shared.settings import Settings
from shared.tasks import NAMESPACE, OUTBOUND_QUEUE, SEND_REPLY

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
BOT_IDS = "sms:bot:ids"  # the set of bot ids: with next-id, written with the old registry's first bot
SEEN_KEY = "sms:seen:"  # + MessageSid or idempotency token: 48 hours (now scoped by account, keys.seen)
# The old release dead-lettered a permanent failure here too (its `dlq list` showed this message's id).
DEAD_QUEUE = f"{NAMESPACE}:{OUTBOUND_QUEUE}.XQ"
# Every key of the old layout, for --purge-redis (old dedupe marks are told apart by having no account).
OLD_PATTERNS = ("sms:bot:*", OPT_OUT_KEY + "*", LOG_KEY + "*" + LOG_SUFFIX, LOG_KEY + "*" + LOG_ENTRIES_SUFFIX,
                STATUS_KEY + "*", DEAD_REPLY_KEY + "*", SEEN_KEY + "*")
# Set once a copy completed: when, and what it copied. A later run copies nothing.
MIGRATED_KEY = "sms:migrated-from-redis"

NAMES = {
    "bots": ("bot", "bots"), "opt_outs": ("opt-out", "opt-outs"), "messages": ("message", "messages"),
    "conversations": ("conversation", "conversations"), "deliveries": ("delivery status", "delivery statuses"),
    "dead_letters": ("dead letter", "dead letters"),
}
# Why a row of each kind may be neither copied nor already there.
SKIPPED_BECAUSE = {
    "messages": "whose Twilio sid another message in the database has",
    "deliveries": "of messages no longer in any conversation's log",
}


class CopyRefused(Exception):
    """The old layout cannot be copied as it stands; nothing was written."""


@dataclass
class Copied:
    """What a copy did, per kind (the table's name): rows written, rows already there, rows left out;
    and what the operator should know besides (`notes`, one line each)."""

    copied: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))
    present: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))
    notes: list[str] = field(default_factory=list)
    migrated_at: float | None = None  # set when an earlier run had copied it all: this one copied nothing

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


def waiting(redis: Any) -> bool:
    """Whether an earlier release's Redis layout is there and not copied yet (the old registry wrote
    its id counter with its first bot; two EXISTS, so the release phase checks this on every deploy)."""
    return not redis.exists(MIGRATED_KEY) and bool(redis.exists(BOT_NEXT_ID, BOT_IDS))


def copy_from_redis(settings: Settings) -> Copied:
    """Copy bots, opt-outs, the message log, delivery statuses and dead letters into the database,
    once; raises CopyRefused, having written nothing, when a bot cannot be copied as it stands."""
    assert settings.database_url is not None
    redis = connect(settings.redis_url)
    engine = make_engine(settings.database_url, size=1)
    vault = Vault(settings.credentials_keys)
    report = Copied()
    try:
        done = redis.get(MIGRATED_KEY)
        if done:
            report.migrated_at = float(json.loads(done)["at"])
            return report
        records = [record for chunk in _records(redis, BOT_KEY + "[0-9]*") for key, record in chunk
                   if key[len(BOT_KEY):].isdigit()]
        _check(engine, vault, records)
        numbers = _copy_bots(engine, vault, records, report)
        RegistryCopy(redis).forget()  # rebuilt from the database, copied bots included, when next read
        stopped = _copy_log(redis, engine, numbers, report)
        _copy_opt_outs(redis, engine, stopped, report)
        _copy_deliveries(redis, engine, report)
        _copy_dead_letters(redis, engine, report)
        _move_bot_ids_past(engine, int(redis.get(BOT_NEXT_ID) or 0))
        _carry_dedupe_marks(redis, {record["twilio-account-sid"] for record in records}, report)
        report.notes += _private_engines(records, AddressPolicy.for_settings(settings))
        redis.set(MIGRATED_KEY, json.dumps({"at": time.time(), "summary": report.summary()}))
    finally:
        engine.dispose()
        redis.close()
    return report


def purge(settings: Settings) -> int:
    """Delete the old layout's keys (its bot records hold engine URLs in plain text) once it was
    copied; returns how many. Raises CopyRefused while it was not."""
    redis = connect(settings.redis_url)
    try:
        if not redis.exists(MIGRATED_KEY):
            raise CopyRefused("the earlier release's Redis layout was not copied yet: run `mammut-sms migrate` first")
        deleted = 0
        for pattern in OLD_PATTERNS:
            for chunk in _scan(redis, pattern):
                old = [key for key in chunk if not key.startswith(SEEN_KEY) or _old_mark(key)]
                deleted += redis.unlink(*old) if old else 0
        return deleted
    finally:
        redis.close()


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


def _check(engine: Engine, vault: Vault, records: list[dict[str, Any]]) -> None:
    """Refuse, before anything is written, a token CREDENTIALS_KEY cannot decrypt (every webhook
    would answer 503) and a bot in the database that is another bot under an old bot's id or number
    (a bot created meanwhile: the old bot's log would be attached to it)."""
    unreadable = sorted(int(record["id"]) for record in records
                        if not _decrypts(vault, record["twilio-auth-token-encrypted"]))
    if unreadable:
        raise CopyRefused(
            f"CREDENTIALS_KEY cannot decrypt the Twilio auth token of bot(s) {', '.join(map(str, unreadable))}: set "
            "it to the key the earlier release ran with (a new key goes first, the old one after a comma); nothing "
            "was copied")
    numbers = [record["main-phone-number"] for record in records]
    with engine.connect() as connection:
        by_id = {row.id: row for row in connection.execute(
            select(bots.c.id, bots.c.account_sid, bots.c.main_phone_number).where(
                bots.c.id.in_([int(record["id"]) for record in records])))}
        owners = dict(connection.execute(select(bots.c.main_phone_number, bots.c.id).where(
            bots.c.main_phone_number.in_(numbers))).all())
        owners.update(connection.execute(select(bot_numbers.c.number, bot_numbers.c.bot_id).where(
            bot_numbers.c.number.in_(numbers))).all())
    clashes = []
    for record in records:
        bot_id, number, account = int(record["id"]), record["main-phone-number"], record["twilio-account-sid"]
        there = by_id.get(bot_id)
        if there is not None and (there.main_phone_number, there.account_sid) != (number, account):
            clashes.append(f"bot {bot_id} ({number}, account {account}) is another bot in the database "
                           f"({there.main_phone_number}, account {there.account_sid})")
        elif owners.get(number, bot_id) != bot_id:
            clashes.append(f"bot {bot_id}'s number {number} belongs to bot {owners[number]} in the database")
    if clashes:
        raise CopyRefused("; ".join(clashes) + ": delete or renumber the database's bot, then run "
                          "`mammut-sms migrate` again; nothing was copied")


def _decrypts(vault: Vault, token: str) -> bool:
    try:
        vault.decrypt(token)
    except ValueError:
        return False
    return True


def _copy_bots(engine: Engine, vault: Vault, records: list[dict[str, Any]], report: Copied) -> dict[int, str]:
    """Copy every bot with its id (and its number into bot_numbers); returns their numbers by id."""
    for chunk in _batches(records):
        rows = [_bot_row(record, vault) for record in chunk]
        with transaction(engine) as connection:
            present = {key for key, in _existing(connection, [bots.c.id], [(row["id"],) for row in rows])}
            fresh = [row for row in rows if row["id"] not in present]
            insert_ignoring_duplicates(connection, bots, fresh)
            insert_ignoring_duplicates(connection, bot_numbers,
                                       [{"number": row["main_phone_number"], "bot_id": row["id"]} for row in fresh])
        report.add("bots", len(fresh), len(present))
    return {int(record["id"]): record["main-phone-number"] for record in records}


def _bot_row(record: dict[str, Any], vault: Vault) -> dict[str, Any]:
    now = time.time()
    engine_url = record.get("engine-url")
    return {
        "id": int(record["id"]),
        "name": record.get("name") or "",
        "account_sid": record["twilio-account-sid"],
        "auth_token_encrypted": record["twilio-auth-token-encrypted"],  # Fernet: copied as it is
        "main_phone_number": record["main-phone-number"],
        "engine_url": vault.encrypt(engine_url) if engine_url else None,  # it may carry a key, as the registry's
        "messages_per_second": float(record.get("messages-per-second") or 1.0),
        "fallback_message": record.get("fallback-message"),
        "extra": record.get("extra") or {},
        "created_at": float(record.get("created-at") or now),
        "updated_at": float(record.get("updated-at") or now),
    }


def _copy_opt_outs(redis: Any, engine: Engine, stopped: dict[tuple[str, str], float], report: Copied) -> None:
    """Everyone in a number's set is opted out, since their STOP in the log if it still holds it."""
    now = time.time()
    for chunk in _scan(redis, OPT_OUT_KEY + "*"):
        rows = ({"bot_number": (number := key[len(OPT_OUT_KEY):]), "person": person, "opted_out": True,
                 "how": OPT_OUT_HOW, "at": stopped.get((number, person), now)}
                for key in chunk for person in redis.sscan_iter(key, count=SCAN_COUNT))
        for batch in _batches(rows):
            report.add("opt_outs", *_copy_rows(engine, opt_outs, batch))


def _copy_log(redis: Any, engine: Engine, numbers: dict[int, str], report: Copied) -> dict[tuple[str, str], float]:
    """Copy each conversation's log into `messages`, and its last entry into `conversations`; returns
    when each person last texted a bot number an opt-out keyword, as far as the log tells."""
    stopped: dict[tuple[str, str], float] = {}
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
            stopped.update(((row["bot_number"], person), row["at"]) for row in logged  # oldest first: the last wins
                           if row["direction"] == "in" and classify(row["text"]) == OPT_OUT)
        for batch in _batches(rows):
            report.add("messages", *_copy_rows(engine, messages, batch))
        for batch in _batches(last):
            report.add("conversations", *_copy_conversations(engine, batch))
    return stopped


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
    """Copy each dead reply; then take its message off Dramatiq's dead-letter queue, where the old
    release also put it (left there, it would show as a second, empty dead letter once the row is
    replayed), and say which id `dlq replay` now takes for the one the old `dlq list` showed."""
    copied: set[str] = set()
    for chunk in _records(redis, DEAD_REPLY_KEY + "*"):
        rows = [_dead_letter_row(key[len(DEAD_REPLY_KEY):], reply) for key, reply in chunk]
        report.add("dead_letters", *_copy_rows(engine, dead_letters, rows))
        copied.update(row["id"] for row in rows)
    for message_id, reply_id in _dead_messages(redis):
        if reply_id in copied:
            redis.zrem(DEAD_QUEUE, message_id)
            redis.hdel(DEAD_QUEUE + ".msgs", message_id)
            report.notes.append(f"dead letter {message_id} is now {reply_id} (`mammut-sms dlq replay {reply_id}`)")


def _dead_messages(redis: Any) -> Iterator[tuple[str, str]]:
    """(message id, reply id) of each send_reply message in Dramatiq's dead-letter queue."""
    ids = redis.zrange(DEAD_QUEUE, 0, -1)
    for message_id, raw in zip(ids, redis.hmget(DEAD_QUEUE + ".msgs", ids) if ids else []):
        if raw is None:
            continue
        message = dramatiq.Message.decode(raw.encode("utf-8"))
        if message.actor_name == SEND_REPLY and len(message.args) > 1:
            yield message_id, message.args[1]


def _carry_dedupe_marks(redis: Any, accounts: set[str], report: Copied) -> None:
    """Write each old dedupe mark again under every old bot's account, for the rest of its life: a
    Twilio retry of a text the old release accepted stays a duplicate, at no cost to the webhook."""
    carried = 0
    for chunk in _scan(redis, SEEN_KEY + "*"):
        old = [key for key in chunk if _old_mark(key)]
        pipe = redis.pipeline(transaction=False)
        for key in old:
            pipe.pttl(key)
        pipe_set = redis.pipeline(transaction=False)
        for key, ttl in zip(old, pipe.execute()):
            if ttl > 0 and accounts:
                for account in accounts:
                    pipe_set.set(keys.seen(account, key[len(SEEN_KEY):]), "1", nx=True, px=ttl)
                carried += 1
        pipe_set.execute()
    if carried:
        LegacyMarks.extend(redis)  # the webhook looks for them until they expire
        report.notes.append(f"{carried} Twilio dedupe mark(s) of the earlier release kept for the rest of their "
                            "48 hours")


def _old_mark(key: str) -> bool:
    """An old release's dedupe mark names no account (keys.seen's have one before the token)."""
    return ":" not in key[len(SEEN_KEY):]


def _private_engines(records: list[dict[str, Any]], policy: AddressPolicy) -> list[str]:
    """A line per bot whose engine the worker will not call (a loopback or private address): it
    answers with its fallback until ENGINE_ALLOWED_NETWORKS allows that network."""
    refused = []
    for record in records:
        url = urlsplit(record.get("engine-url") or "")
        if not url.hostname:
            continue
        try:
            policy.resolve(url.hostname, url.port or (443 if url.scheme == "https" else 80))
        except RefusedAddress as error:
            refused.append(f"bot {record['id']}: its engine {error.host} is {error.address} ({error.reason}); it "
                           "answers with its fallback until ENGINE_ALLOWED_NETWORKS includes that network")
        except OSError:
            continue  # not resolvable from here: the worker logs it when it calls
    return refused


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
