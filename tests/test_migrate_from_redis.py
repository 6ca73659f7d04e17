"""`mammut-sms migrate --from-redis`: a deployment's Redis, as the release before the database left
it, copied into the database once, with nothing copied twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import Engine, Table, select

from cli.main import main
from shared.crypto import Vault
from shared.db import make_engine
from shared.schema import bots, conversations, dead_letters, deliveries, messages, opt_outs
from shared.settings import get_settings
from tests.conftest import BOT_ACCOUNT_SID, CREDENTIALS_KEY

SUPPORT, SALES = "+15005550006", "+15005550007"
ANA, BEA, CRIS = "+15551230001", "+15551230002", "+15551230003"
TOKENS = {3: "3" * 32, 7: "7" * 32}
T0 = 1_700_000_000.0
TABLES = (bots, opt_outs, messages, conversations, deliveries, dead_letters)

FIRST_SUMMARY = (
    "copied from Redis: 2 bots, 2 opt-outs, 4 messages in 2 conversations (1 delivery status), 1 dead letter; "
    "already in the database: 0 bots, 0 opt-outs, 0 messages in 0 conversations (0 delivery statuses), "
    "0 dead letters; not copied: 1 delivery status of messages no longer in any conversation's log"
)
SECOND_SUMMARY = (
    "copied from Redis: 0 bots, 0 opt-outs, 0 messages in 0 conversations (0 delivery statuses), 0 dead letters; "
    "already in the database: 2 bots, 2 opt-outs, 4 messages in 2 conversations (1 delivery status), "
    "1 dead letter; not copied: 1 delivery status of messages no longer in any conversation's log"
)


def _bot(bot_id: int, name: str, number: str) -> dict[str, Any]:
    """A bot record as the old registry (shared/bots.py's BotStore) wrote it."""
    return {
        "id": bot_id, "name": name, "twilio-account-sid": BOT_ACCOUNT_SID,
        "twilio-auth-token-encrypted": Vault([CREDENTIALS_KEY]).encrypt(TOKENS[bot_id]), "main-phone-number": number,
        "engine-url": f"http://engine.test/{bot_id}", "messages-per-second": 2.5, "fallback-message": None,
        "extra": {"team": name.lower()}, "created-at": T0, "updated-at": T0 + 1,
    }


def _entry(entry_id: str, direction: str, body: str, at: float, status: str, sid: str | None = None,
           error_code: int | None = None, media: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A message log entry as shared/messagelog.py's new_entry made it, after its last update."""
    return {"id": entry_id, "direction": direction, "text": body, "media": media or [], "sid": sid,
            "status": status, "error-code": error_code, "statuses": {status: at}, "at": at}


def _log(redis: redis_lib.Redis, conversation: str, *entries: dict[str, Any]) -> None:
    redis.rpush(f"sms:conv:{{{conversation}}}:log", *[entry["id"] for entry in entries])
    redis.hset(f"sms:conv:{{{conversation}}}:log-entries",
               mapping={entry["id"]: json.dumps(entry) for entry in entries})


@pytest.fixture
def old_layout(redis: redis_lib.Redis) -> None:
    """Two bots (a third, id 5, was deleted), opt-outs, two conversations' logs, Twilio's statuses
    for a sent reply and for one the log no longer holds, and a dead reply."""
    for bot in (_bot(3, "Support", SUPPORT), _bot(7, "Sales", SALES)):
        redis.set(f"sms:bot:{bot['id']}", json.dumps(bot))
        redis.set(f"sms:bot:number:{bot['main-phone-number']}", bot["id"])
        redis.sadd("sms:bot:ids", bot["id"])
    redis.set("sms:bot:next-id", 7)
    redis.sadd(f"sms:optout:{SUPPORT}", BEA, CRIS)
    _log(redis, f"3:{ANA}",
         _entry("SMin1", "in", "hola", T0 + 10, "received", sid="SMin1",
                media=[{"url": "https://media.test/1", "content_type": "image/png"}]),
         _entry("reply1", "out", "¿en qué te ayudo?", T0 + 11, "queued", sid="SMout1"),
         _entry("reply2", "out", "adiós", T0 + 12, "failed", error_code=21211))
    _log(redis, f"7:{ANA}", _entry("SMin2", "in", "precio?", T0 + 20, "received", sid="SMin2"))
    redis.hset("sms:status:SMout1", mapping={
        "status": "delivered", "rank": 4, "at:queued": T0 + 11, "at:sent": T0 + 12, "at:delivered": T0 + 13})
    redis.hset("sms:status:SMtrimmed", mapping={"status": "sent", "rank": 3, "at:sent": T0 + 1})
    reply = {"id": "reply2", "conversation": f"3:{ANA}", "bot_id": 3, "to": ANA, "text": "adiós", "media_url": None,
             "in_reply_to": "SMin1", "received_at": T0 + 10, "created_at": T0 + 12, "attempts": 1,
             "first_attempt_at": T0 + 12, "not_before": None, "slot_at": None, "sid": None, "error_code": 21211}
    redis.set("sms:dead-reply:reply2", json.dumps({
        **reply, "error": "The 'To' number is not a valid phone number.", "http_status": 400, "reason": "permanent",
        "failed_at": T0 + 12.5}))


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, redis_url: str, database: str) -> Iterator[None]:
    for name, value in {"DATABASE_URL": database, "REDIS_URL": redis_url, "MAMMUT_SMS_ENV": "development",
                        "CREDENTIALS_KEY": CREDENTIALS_KEY}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def engine(database: str) -> Iterator[Engine]:
    engine = make_engine(database, size=1)
    yield engine
    engine.dispose()


def _migrate(capsys: pytest.CaptureFixture[str]) -> str:
    """Run `mammut-sms migrate --from-redis`; its last line, the copy's summary."""
    assert 0 == main(["migrate", "--from-redis"])
    return capsys.readouterr().out.strip().splitlines()[-1]


def _rows(engine: Engine, table: Table) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        key = list(table.primary_key.columns)
        return [dict(row._mapping) for row in connection.execute(select(table).order_by(*key))]


class TestCopy:
    """Every durable fact of the old layout lands in its table, as the new release reads it."""

    @pytest.fixture(autouse=True)
    def copied(self, old_layout: None, environment: None, capsys: pytest.CaptureFixture[str]) -> str:
        return _migrate(capsys)

    def test_bots_keep_their_ids_names_numbers_and_tokens(self, engine: Engine) -> None:
        """Each bot keeps its id and settings, and its token decrypts with CREDENTIALS_KEY."""
        rows = _rows(engine, bots)
        vault = Vault([CREDENTIALS_KEY])
        assert [(3, "Support", SUPPORT, TOKENS[3]), (7, "Sales", SALES, TOKENS[7])] == [
            (row["id"], row["name"], row["main_phone_number"], vault.decrypt(row["auth_token_encrypted"]))
            for row in rows]
        assert {"account_sid": BOT_ACCOUNT_SID, "engine_url": "http://engine.test/3", "messages_per_second": 2.5,
                "fallback_message": None, "extra": {"team": "support"}, "created_at": T0, "updated_at": T0 + 1} == {
            name: rows[0][name] for name in ("account_sid", "engine_url", "messages_per_second", "fallback_message",
                                             "extra", "created_at", "updated_at")}

    def test_opt_outs_are_copied_as_opted_out(self, engine: Engine) -> None:
        """Everyone in a number's opt-out set is opted out of that number, marked as migrated."""
        assert [(SUPPORT, BEA, True, "migrated from Redis"), (SUPPORT, CRIS, True, "migrated from Redis")] == [
            (row["bot_number"], row["person"], row["opted_out"], row["how"]) for row in _rows(engine, opt_outs)]

    def test_the_log_becomes_messages_and_conversations(self, engine: Engine) -> None:
        """Each log entry is a message of its bot and person; each conversation points at its last one."""
        expected = [
            ("SMin1", 3, ANA, SUPPORT, "in", "person", "hola", "SMin1", "received", None, T0 + 10),
            ("SMin2", 7, ANA, SALES, "in", "person", "precio?", "SMin2", "received", None, T0 + 20),
            ("reply1", 3, ANA, SUPPORT, "out", "engine", "¿en qué te ayudo?", "SMout1", "queued", None, T0 + 11),
            ("reply2", 3, ANA, SUPPORT, "out", "engine", "adiós", None, "failed", 21211, T0 + 12),
        ]
        rows = _rows(engine, messages)
        assert expected == [(row["id"], row["bot_id"], row["person"], row["bot_number"], row["direction"],
                             row["origin"], row["text"], row["sid"], row["status"], row["error_code"], row["at"])
                            for row in rows]
        assert [{"url": "https://media.test/1", "content_type": "image/png"}] == rows[0]["media"]
        assert [(3, ANA, "reply2", T0 + 12), (7, ANA, "SMin2", T0 + 20)] == [
            (row["bot_id"], row["person"], row["last_message_id"], row["last_at"])
            for row in _rows(engine, conversations)]

    def test_delivery_statuses_are_copied_for_logged_messages(self, engine: Engine) -> None:
        """A sent reply's status and the time of each status are kept; a status without a logged
        message (its bot unknown) is left out."""
        [row] = _rows(engine, deliveries)
        assert ("SMout1", 3, "delivered", 4, None, T0 + 13) == (
            row["sid"], row["bot_id"], row["status"], row["rank"], row["error_code"], row["updated_at"])
        assert (T0 + 11, T0 + 12, T0 + 13, None) == (row["queued_at"], row["sent_at"], row["delivered_at"],
                                                     row["read_at"])

    def test_dead_letters_keep_why_they_failed(self, engine: Engine) -> None:
        """A dead reply keeps its recipient, text, Twilio's answer, reason, attempts and time of death."""
        [row] = _rows(engine, dead_letters)
        assert {"id": "reply2", "bot_id": 3, "person": ANA, "text": "adiós", "media_url": None, "error_code": 21211,
                "http_status": 400, "error": "The 'To' number is not a valid phone number.", "reason": "permanent",
                "attempts": 1, "failed_at": T0 + 12.5} == row

    def test_the_summary_counts_what_was_copied(self, copied: str) -> None:
        """The command says how many of each kind it copied, and what it left out."""
        assert FIRST_SUMMARY == copied

    def test_a_second_run_copies_nothing_and_reports_everything_present(
            self, engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
        """Running it again changes no row and reports every record as already there."""
        before = {table.name: _rows(engine, table) for table in TABLES}
        assert SECOND_SUMMARY == _migrate(capsys)
        assert before == {table.name: _rows(engine, table) for table in TABLES}

    def test_a_new_bot_gets_an_id_above_every_copied_and_deleted_one(self, engine: Engine) -> None:
        """The next id is past the old registry's last (7 copied, and ids up to 7 handed out)."""
        with engine.begin() as connection:
            new_id = connection.execute(bots.insert().values(
                name="New", account_sid=BOT_ACCOUNT_SID, auth_token_encrypted="x", main_phone_number="+15005550008",
                messages_per_second=1.0, extra={}, created_at=T0, updated_at=T0).returning(bots.c.id)).scalar_one()
        assert 8 == new_id


@pytest.mark.usefixtures("environment")
def test_a_deleted_bots_id_is_never_given_to_a_new_bot(redis: redis_lib.Redis, engine: Engine,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Ids the old registry handed out to bots since deleted stay taken: their logs may have been copied."""
    redis.set("sms:bot:3", json.dumps(_bot(3, "Support", SUPPORT)))
    redis.set("sms:bot:next-id", 9)  # bots 4 to 9 were deleted
    _migrate(capsys)
    with engine.begin() as connection:
        new_id = connection.execute(bots.insert().values(
            name="New", account_sid=BOT_ACCOUNT_SID, auth_token_encrypted="x", main_phone_number=SALES,
            messages_per_second=1.0, extra={}, created_at=T0, updated_at=T0).returning(bots.c.id)).scalar_one()
    assert 10 == new_id


@pytest.mark.usefixtures("environment")
def test_an_empty_redis_copies_nothing(redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    """Without old data (a new deployment), the copy is a no-op that says so."""
    assert _migrate(capsys).startswith("copied from Redis: 0 bots, 0 opt-outs, 0 messages in 0 conversations")


@pytest.mark.usefixtures("old_layout", "environment")
def test_small_batches_copy_the_same(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Batch and SCAN sizes change how many transactions a copy takes, not what it copies."""
    monkeypatch.setattr("cli.from_redis.BATCH", 1)
    monkeypatch.setattr("cli.from_redis.SCAN_COUNT", 1)
    assert FIRST_SUMMARY == _migrate(capsys)


@pytest.mark.usefixtures("old_layout", "environment")
def test_rows_the_new_release_wrote_are_left_as_they_are(engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    """A person who opted in again, and a conversation that went on, since the deploy keep that state."""
    with engine.begin() as connection:
        connection.execute(opt_outs.insert().values(bot_number=SUPPORT, person=BEA, opted_out=False,
                                                    how="keyword START", at=T0 + 100))
        connection.execute(conversations.insert().values(bot_id=3, person=ANA, last_message_id="SMnew",
                                                         last_at=T0 + 100))
    summary = _migrate(capsys)
    assert summary.startswith("copied from Redis: 2 bots, 1 opt-out, 4 messages in 1 conversation ")
    assert "already in the database: 0 bots, 1 opt-out, 0 messages in 1 conversation " in summary
    assert [(BEA, False, "keyword START"), (CRIS, True, "migrated from Redis")] == [
        (row["person"], row["opted_out"], row["how"]) for row in _rows(engine, opt_outs)]
    assert [(3, "SMnew", T0 + 100), (7, "SMin2", T0 + 20)] == [
        (row["bot_id"], row["last_message_id"], row["last_at"]) for row in _rows(engine, conversations)]


@pytest.mark.usefixtures("old_layout", "environment")
def test_a_bot_whose_number_is_taken_in_the_database_is_reported_not_copied(
        engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    """A bot created in the database first with an old bot's number wins; the summary names the clash."""
    with engine.begin() as connection:
        connection.execute(bots.insert().values(
            id=1, name="Already here", account_sid=BOT_ACCOUNT_SID, auth_token_encrypted="x",
            main_phone_number=SUPPORT, messages_per_second=1.0, extra={}, created_at=T0, updated_at=T0))
    summary = _migrate(capsys)
    assert summary.startswith("copied from Redis: 1 bot, ")
    assert "not copied: 1 bot whose number another bot in the database has, 1 delivery status" in summary
    assert [(1, "Already here"), (7, "Sales")] == [(row["id"], row["name"]) for row in _rows(engine, bots)]
