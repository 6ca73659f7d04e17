"""The message log's outbox: log records join a Redis list in the same step as the work they
describe, and one worker process at a time writes them to the database, hundreds per transaction.

A message's path never waits for the database: the record of an answered message is pushed by the
step that queues its replies, and a reply's outcome by the step that takes it off its outbox, so
the log can neither miss a step nor record one twice, and a database outage delays the log
instead of the replies. Writing is idempotent (inserts of what is there already change nothing,
a status never moves back), so a batch written twice, after a crash between its commit and its
removal from the list, is harmless. A record the database refuses on its own is set aside in
keys.LOG_REFUSED (the last 1,000) with an error in the log, so it cannot hold up the others.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine

from shared import keys, messagelog, news
from shared.background import Periodic
from shared.db import transaction
from shared.erasure import conversation_of_record, erased_since, recorded_at
from shared.logging import get_logger
from shared.redis import script
from shared.messagelog import Exchange, Outcome

log = get_logger(__name__)

BATCH = 500
LEASE_MS = 10_000
# The log lags the work by up to this much; in exchange, each transaction carries more records.
IDLE_POLL_SECONDS = 0.05
STANDBY_POLL_SECONDS = 0.5
# The holder checks (and renews) its lease this often, well within LEASE_MS.
HOLD_CHECK_SECONDS = 2.0
REFUSED_KEPT = 1000
EXCHANGE, OUTCOME = "exchange", "outcome"
FENCED = -1  # drain_once: the lease is another process's

# Take the batch off the list only while the lease is still ours: a writer that lost it (a long
# pause) leaves the batch for the new holder, which writes it again, harmlessly.
_TRIM_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[1], tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""
# Take the lease, or renew it if it is already ours; whether we hold it.
_HOLD_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


_MESSAGE_FIELDS = ("sid", "bot_id", "sender", "to", "body", "media", "received_at")
_REPLY_FIELDS = messagelog.LOGGED_REPLY_FIELDS


def exchange_record(message: Mapping[str, Any], replies: Sequence[Mapping[str, Any]], bot_number: str | None) -> str:
    """An answered inbound message and its replies (INBOUND and REPLY shapes), for the log outbox:
    what the log keeps of them, no more (it passes through Redis). A burst merged into one turn
    (worker.conversation) is logged as the texts it was, each on its own; the replies answer the first."""
    head, *also = message.get("merged") or [message]
    return json.dumps({
        "kind": EXCHANGE, "message": {name: head[name] for name in _MESSAGE_FIELDS},
        "replies": [{name: reply.get(name) for name in _REPLY_FIELDS} for reply in replies], "bot_number": bot_number,
        **({"also": [{name: other[name] for name in _MESSAGE_FIELDS} for other in also]} if also else {}),
    }, separators=(",", ":"))


def outcome_record(reply_id: str, status: str, sid: str | None = None, error_code: int | None = None,
                   at: float | None = None) -> str:
    """How a reply's journey ended (sent with Twilio's sid, suppressed, failed), for the log outbox."""
    return json.dumps({"kind": OUTCOME, "reply_id": reply_id, "status": status, "sid": sid,
                       "error_code": error_code, "at": time.time() if at is None else at}, separators=(",", ":"))


def write(engine: Engine, records: Sequence[Mapping[str, Any]]) -> None:
    """Records in one transaction, in their order's effect: every exchange before any outcome (an
    outcome's reply row comes with its exchange, which was pushed first)."""
    exchanges = [Exchange(message, r["replies"] if n == 0 else [], r["bot_number"])
                 for r in records if r["kind"] == EXCHANGE for n, message in enumerate([r["message"], *r.get("also", [])])]
    outcomes = [Outcome(r["reply_id"], r["status"], sid=r["sid"], error_code=r["error_code"], at=r["at"])
                for r in records if r["kind"] == OUTCOME]
    with transaction(engine) as connection:
        messagelog.record_exchanges(connection, exchanges)
        for record in records:
            if record["kind"] == messagelog.PUSHED:
                messagelog.record_replies(connection, record["replies"], record["bot_number"], record["origin"])
        messagelog.record_outcomes(connection, outcomes)


def drain_once(redis: Any, engine: Engine, token: str, batch: int = BATCH) -> int:
    """Write the oldest records (the caller holds the lease under `token`); returns how many left
    the list, or FENCED when the lease turned out to be another process's (nothing left it)."""
    raw = redis.lrange(keys.LOG_OUTBOX, 0, batch - 1)
    if not raw:
        return 0
    taken = len(raw)
    records, raw = _without_erased(redis, [json.loads(item) for item in raw], raw)
    try:
        write(engine, records)
    except Exception as error:  # noqa: BLE001 - find the record at fault, write the others
        log.warning("log_drain.batch_failed", records=len(records), error=error.__class__.__name__)
        _write_one_by_one(redis, engine, raw, records)
    if not redis.eval(_TRIM_LUA, 2, keys.LOG_OUTBOX, keys.LOG_DRAIN_LOCK, token, taken, LEASE_MS):
        return FENCED
    _announce(redis, records)
    return taken


def _announce(redis: Any, records: Sequence[Mapping[str, Any]]) -> None:
    """Tell the console's open pages which conversations the log now shows more of."""
    changed = {(r["message"].get("bot_id"), r["message"].get("sender")) for r in records
               if r.get("kind") == EXCHANGE and isinstance(r.get("message"), dict)}
    # An engine's push (or a replay) names each reply's recipient.
    changed |= {(reply.get("bot_id"), reply.get("to")) for r in records
                if r.get("kind") == messagelog.PUSHED and isinstance(r.get("replies"), list)
                for reply in r["replies"] if isinstance(reply, dict)}
    if any(r.get("kind") == OUTCOME for r in records):
        changed.add((None, None))  # an outcome names its reply only
    news.publish_all(redis, changed)


def _without_erased(redis: Any, records: list[dict[str, Any]], raw: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records, less exchanges of conversations erased (on request) after their message came:
    written now, they would bring back what was erased. One MGET per batch."""
    erased = erased_since(redis, sorted({c for record in records if (c := conversation_of_record(record)) is not None}))
    if not erased:
        return records, raw
    kept = [(record, item) for record, item in zip(records, raw)
            if (c := conversation_of_record(record)) not in erased or recorded_at(record) > erased[c]]
    return [record for record, _ in kept], [item for _, item in kept]


def _write_one_by_one(redis: Any, engine: Engine, raw: list[str], records: list[dict[str, Any]]) -> None:
    """After a failed batch: each record alone. A database that refuses every one is down, and the
    batch stays on the list (raised); one refused alone is set aside."""
    written = 0
    refused: list[tuple[str, Exception]] = []
    for item, record in zip(raw, records):
        try:
            write(engine, [record])
            written += 1
        except Exception as error:  # noqa: BLE001
            refused.append((item, error))
    if not written and refused:
        raise refused[0][1]
    for item, error in refused:
        log.error("log_drain.record_refused", error=str(error)[:300], record=item[:300])
        redis.lpush(keys.LOG_REFUSED, item)
    redis.ltrim(keys.LOG_REFUSED, 0, REFUSED_KEPT - 1)


def forget_refused_before(redis: Any, cutoff: float) -> int:
    """Drop the records set aside in keys.LOG_REFUSED that tell of something before `cutoff` (the
    retention period's start: they hold texts and numbers); returns how many went."""
    dropped = 0
    for raw in redis.lrange(keys.LOG_REFUSED, 0, -1):
        if _record_time(raw) < cutoff:
            dropped += redis.lrem(keys.LOG_REFUSED, 0, raw)
    return dropped


def _record_time(raw: str) -> float:
    """When what a record tells of happened (an exchange's message came, an outcome was reached); 0
    for a record too malformed to say, which no retention period keeps."""
    try:
        record = json.loads(raw)
        at = record["message"]["received_at"] if record.get("kind") == EXCHANGE else record["at"]
        return float(at)
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0.0


def drain(redis: Any, engine: Engine, timeout: float = 10.0) -> None:
    """Write everything on the log outbox now (tests, and tools that read the log right after work)."""
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    while not redis.set(keys.LOG_DRAIN_LOCK, token, nx=True, px=LEASE_MS):
        if time.monotonic() > deadline:
            raise TimeoutError("another process holds the log drain lease")
        time.sleep(0.01)
    try:
        while drain_once(redis, engine, token) > 0:
            pass
    finally:
        redis.eval(_RELEASE_LUA, 1, keys.LOG_DRAIN_LOCK, token)


class LogDrain(Periodic):
    """Writes the log outbox while this process holds the lease."""

    name = "log_drain"
    first_pause = STANDBY_POLL_SECONDS

    def __init__(self, redis: Any, engine: Engine) -> None:
        super().__init__()
        self._redis, self._engine = redis, engine
        self._token = uuid.uuid4().hex
        self._check_at = 0.0

    def stop(self, timeout: float = 5.0) -> None:
        """Stop, writing what is left if no other process is writing (a dyno's shutdown)."""
        super().stop(timeout)
        try:
            self._redis.eval(_RELEASE_LUA, 1, keys.LOG_DRAIN_LOCK, self._token)
            drain(self._redis, self._engine, timeout=0.5)
        except Exception:  # noqa: BLE001 - another process will write it
            pass

    def turn(self) -> float:
        """Drain while records come; the pause before the next turn. The lease is checked (and
        renewed) every HOLD_CHECK_SECONDS, not on each 50 ms poll: each batch's trim is fenced by
        it anyway, and renews it."""
        now = time.monotonic()
        if now >= self._check_at:
            if not script(self._redis, _HOLD_LUA)(keys=[keys.LOG_DRAIN_LOCK], args=[self._token, LEASE_MS]):
                return STANDBY_POLL_SECONDS
            self._check_at = now + HOLD_CHECK_SECONDS
        while not self.stopping and (written := drain_once(self._redis, self._engine, self._token)) == BATCH:
            pass
        if written == FENCED:
            self._check_at = 0.0  # the lease passed on: ask for it again before the next batch
        return IDLE_POLL_SECONDS
