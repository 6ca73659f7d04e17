"""`mammut-sms migrate` (the release phase) and `--from-redis`: a deployment's Redis, as the release
before the database left it, copied into the database once, before the new processes start, with
nothing copied twice and nothing the new release deleted brought back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis as redis_lib
from cryptography.fernet import Fernet
from flask.testing import FlaskClient
from sqlalchemy import Engine, Table, select

from cli.from_redis import MIGRATED_KEY
from cli.main import main
from cli.twilio_standin import TwilioStandin
from shared import erasure, keys
from shared.bots import BotStore, number_route
from shared.crypto import Vault
from shared.db import make_engine
from shared.schema import bot_numbers, bots, conversations, dead_letters, deliveries, messages, opt_outs
from shared.settings import get_settings
from shared.tasks import CONVERSATIONS_QUEUE, OUTBOUND_QUEUE
from tests.conftest import BOT_ACCOUNT_SID, CREDENTIALS_KEY, free_port
from tests.support.processes import ROOT, procfile
from tests.test_inbound import inbox
from tests.test_signature import inbound_params, post_signed

SUPPORT, SALES = "+15005550006", "+15005550007"
ANA, BEA, CRIS = "+15551230001", "+15551230002", "+15551230003"
TOKENS = {3: "3" * 32, 7: "7" * 32}
T0 = 1_700_000_000.0
TABLES = (bots, opt_outs, messages, conversations, deliveries, dead_letters)
# Engine URLs carrying a key, as the old registry kept them (in plain text).
ENGINE_URLS = {3: "http://engine.test/3?key=s3cret", 7: "http://engine.test/7?key=s7cret"}
# The dead reply's message in Dramatiq's dead-letter queue, under the id the old `dlq list` showed.
OLD_DEAD_ID = "5b0f6a1e-old-dlq-id"
OLD_TOKEN = "idem-token-of-SMin1"  # the I-Twilio-Idempotency-Token of Twilio's first request for SMin1

FIRST_SUMMARY = (
    "copied from Redis: 2 bots, 2 opt-outs, 5 messages in 3 conversations (1 delivery status), 1 dead letter; "
    "already in the database: 0 bots, 0 opt-outs, 0 messages in 0 conversations (0 delivery statuses), "
    "0 dead letters; not copied: 1 delivery status of messages no longer in any conversation's log"
)


def _bot(bot_id: int, name: str, number: str) -> dict[str, Any]:
    """A bot record as the old registry (shared/bots.py's BotStore) wrote it."""
    return {
        "id": bot_id, "name": name, "twilio-account-sid": BOT_ACCOUNT_SID,
        "twilio-auth-token-encrypted": Vault([CREDENTIALS_KEY]).encrypt(TOKENS[bot_id]), "main-phone-number": number,
        "engine-url": ENGINE_URLS[bot_id], "messages-per-second": 2.5, "fallback-message": None,
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
    """Two bots (a third, id 5, was deleted), opt-outs (one with its STOP in the log), three
    conversations' logs, Twilio's statuses for a sent reply and for one the log no longer holds, a
    dead reply (also in Dramatiq's dead-letter queue), and the dedupe marks of a text accepted an hour ago."""
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
    _log(redis, f"3:{BEA}", _entry("SMin3", "in", "Stop", T0 + 30, "received", sid="SMin3"))
    redis.hset("sms:status:SMout1", mapping={
        "status": "delivered", "rank": 4, "at:queued": T0 + 11, "at:sent": T0 + 12, "at:delivered": T0 + 13})
    redis.hset("sms:status:SMtrimmed", mapping={"status": "sent", "rank": 3, "at:sent": T0 + 1})
    reply = {"id": "reply2", "conversation": f"3:{ANA}", "bot_id": 3, "to": ANA, "text": "adiós", "media_url": None,
             "in_reply_to": "SMin1", "received_at": T0 + 10, "created_at": T0 + 12, "attempts": 1,
             "first_attempt_at": T0 + 12, "not_before": None, "slot_at": None, "sid": None, "error_code": 21211}
    redis.set("sms:dead-reply:reply2", json.dumps({
        **reply, "error": "The 'To' number is not a valid phone number.", "http_status": 400, "reason": "permanent",
        "failed_at": T0 + 12.5}))
    dead = dramatiq.Message(queue_name="outbound", actor_name="send_reply", args=(f"3:{ANA}", "reply2"), kwargs={},
                            options={}, message_id=OLD_DEAD_ID)
    redis.zadd("dramatiq:outbound.XQ", {OLD_DEAD_ID: (T0 + 12.5) * 1000})
    redis.hset("dramatiq:outbound.XQ.msgs", OLD_DEAD_ID, dead.encode().decode())
    for token in ("SMin1", OLD_TOKEN):
        redis.set(f"sms:seen:{token}", "1", ex=47 * 3600)


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


def _migrate(capsys: pytest.CaptureFixture[str], *options: str) -> str:
    """Run `mammut-sms migrate --from-redis` (or, given options, with those); its last line, the copy's summary."""
    assert 0 == main(["migrate", *(options or ["--from-redis"])])
    return capsys.readouterr().out.strip().splitlines()[-1]


def _release(capsys: pytest.CaptureFixture[str]) -> str:
    """Run `mammut-sms migrate` as the Procfile's release line does; its last line."""
    assert 0 == main(["migrate"])
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
        assert {"account_sid": BOT_ACCOUNT_SID, "messages_per_second": 2.5,
                "fallback_message": None, "extra": {"team": "support"}, "created_at": T0, "updated_at": T0 + 1} == {
            name: rows[0][name] for name in ("account_sid", "messages_per_second", "fallback_message",
                                             "extra", "created_at", "updated_at")}

    def test_engine_urls_are_stored_encrypted_and_read_back_by_the_registry(
            self, engine: Engine, redis: redis_lib.Redis) -> None:
        """An engine URL's key is not in the database in plain text; the registry reads the URL as it was."""
        assert not any("s3cret" in (row["engine_url"] or "") for row in _rows(engine, bots))
        store = BotStore(engine, redis, Vault([CREDENTIALS_KEY]))
        assert [ENGINE_URLS[3], ENGINE_URLS[7]] == [bot.engine_url for bot in store.all()]
        assert store.by_number(SUPPORT) is not None
        with engine.connect() as connection:  # a new bot cannot take their numbers, even concurrently
            assert [(SUPPORT, 3), (SALES, 7)] == connection.execute(
                select(bot_numbers.c.number, bot_numbers.c.bot_id).order_by(bot_numbers.c.number)).all()

    def test_opt_outs_are_copied_as_opted_out(self, engine: Engine) -> None:
        """Everyone in a number's opt-out set is opted out of that number, marked as migrated."""
        assert [(SUPPORT, BEA, True, "migrated from Redis"), (SUPPORT, CRIS, True, "migrated from Redis")] == [
            (row["bot_number"], row["person"], row["opted_out"], row["how"]) for row in _rows(engine, opt_outs)]

    def test_an_opt_out_keeps_the_time_of_its_stop_when_the_log_has_it(self, engine: Engine) -> None:
        """Bea's STOP is in the log: her opt-out dates from it; Cris's is not: hers from the copy."""
        bea, cris = _rows(engine, opt_outs)
        assert T0 + 30 == bea["at"]
        assert time.time() - 60 < cris["at"] <= time.time()

    def test_the_log_becomes_messages_and_conversations(self, engine: Engine) -> None:
        """Each log entry is a message of its bot and person; each conversation points at its last one."""
        expected = [
            ("SMin1", 3, ANA, SUPPORT, "in", "person", "hola", "SMin1", "received", None, T0 + 10),
            ("SMin2", 7, ANA, SALES, "in", "person", "precio?", "SMin2", "received", None, T0 + 20),
            ("SMin3", 3, BEA, SUPPORT, "in", "person", "Stop", "SMin3", "received", None, T0 + 30),
            ("reply1", 3, ANA, SUPPORT, "out", "engine", "¿en qué te ayudo?", "SMout1", "queued", None, T0 + 11),
            ("reply2", 3, ANA, SUPPORT, "out", "engine", "adiós", None, "failed", 21211, T0 + 12),
        ]
        rows = _rows(engine, messages)
        assert expected == [(row["id"], row["bot_id"], row["person"], row["bot_number"], row["direction"],
                             row["origin"], row["text"], row["sid"], row["status"], row["error_code"], row["at"])
                            for row in rows]
        assert [{"url": "https://media.test/1", "content_type": "image/png"}] == rows[0]["media"]
        assert [(3, ANA, "reply2", T0 + 12), (3, BEA, "SMin3", T0 + 30), (7, ANA, "SMin2", T0 + 20)] == [
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

    def test_a_second_run_copies_nothing_and_says_when_the_copy_was_made(
            self, engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
        """Running it again changes no row and says the layout was copied already."""
        before = {table.name: _rows(engine, table) for table in TABLES}
        assert "nothing copied (`mammut-sms migrate --purge-redis` deletes its keys)" in _migrate(capsys)
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
    assert summary.startswith("copied from Redis: 2 bots, 1 opt-out, 5 messages in 2 conversations ")
    assert "already in the database: 0 bots, 1 opt-out, 0 messages in 1 conversation " in summary
    assert [(BEA, False, "keyword START"), (CRIS, True, "migrated from Redis")] == [
        (row["person"], row["opted_out"], row["how"]) for row in _rows(engine, opt_outs)]
    assert [(3, "SMnew", T0 + 100), (3, "SMin3", T0 + 30), (7, "SMin2", T0 + 20)] == [
        (row["bot_id"], row["last_message_id"], row["last_at"]) for row in _rows(engine, conversations)]


def _add_bot(engine: Engine, bot_id: int, number: str, account: str = BOT_ACCOUNT_SID) -> None:
    with engine.begin() as connection:
        connection.execute(bots.insert().values(
            id=bot_id, name="Already here", account_sid=account, auth_token_encrypted="x",
            main_phone_number=number, messages_per_second=1.0, extra={}, created_at=T0, updated_at=T0))


def _refused(capsys: pytest.CaptureFixture[str], *options: str) -> str:
    """Run `mammut-sms migrate` expecting it to stop; what it said on stderr."""
    assert 1 == main(["migrate", *options])
    return capsys.readouterr().err


def _nothing_written(engine: Engine, redis: redis_lib.Redis) -> None:
    assert {table.name: [] for table in TABLES} == {table.name: _rows(engine, table) for table in TABLES}
    assert (0, 0, 1) == (redis.exists(MIGRATED_KEY), len(redis.keys("sms:seen:AC*")),
                         redis.zcard("dramatiq:outbound.XQ"))


@pytest.mark.usefixtures("old_layout", "environment")
class TestRefused:
    """A copy that would lose or mix up data stops before writing anything, and says why."""

    def test_a_credentials_key_that_cannot_decrypt_the_tokens_stops_the_copy(
            self, monkeypatch: pytest.MonkeyPatch, engine: Engine, redis: redis_lib.Redis,
            capsys: pytest.CaptureFixture[str]) -> None:
        """With another CREDENTIALS_KEY, the release phase fails naming it, and nothing is written."""
        monkeypatch.setenv("CREDENTIALS_KEY", Fernet.generate_key().decode())
        get_settings.cache_clear()
        error = _refused(capsys)
        assert "CREDENTIALS_KEY cannot decrypt the Twilio auth token of bot(s) 3, 7" in error
        _nothing_written(engine, redis)

    def test_a_bot_recreated_under_an_old_bots_id_is_a_conflict(
            self, engine: Engine, redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str]) -> None:
        """Bot 3 created in the database with another number is not merged with the old bot 3."""
        _add_bot(engine, 3, "+15005550009")
        error = _refused(capsys, "--from-redis")
        assert f"bot 3 ({SUPPORT}, account {BOT_ACCOUNT_SID}) is another bot in the database (+15005550009" in error
        with engine.connect() as connection:
            assert [] == connection.execute(select(messages)).all()
        assert 0 == redis.exists(MIGRATED_KEY)

    def test_a_bot_of_another_account_under_an_old_bots_id_is_a_conflict(
            self, engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
        """Same id and number but another Twilio account is another bot too."""
        _add_bot(engine, 3, SUPPORT, account="AC" + "f" * 32)
        assert "bot 3 (" in _refused(capsys)

    def test_an_old_bots_number_taken_by_another_id_is_a_conflict(
            self, engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
        """A bot created in the database first with an old bot's number: the copy names the clash."""
        _add_bot(engine, 1, SUPPORT)
        assert f"bot 3's number {SUPPORT} belongs to bot 1 in the database" in _refused(capsys)
        assert [(1, "Already here")] == [(row["id"], row["name"]) for row in _rows(engine, bots)]


@pytest.mark.usefixtures("old_layout", "environment")
class TestReleasePhase:
    """`mammut-sms migrate`, as the Procfile's release line runs it, copies the old layout once."""

    def test_the_release_phase_copies_an_old_layout_not_yet_copied(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without --from-redis, the copy runs when the old registry's keys are there."""
        assert FIRST_SUMMARY == _release(capsys)

    def test_numbers_answer_as_soon_as_the_new_processes_start(
            self, client: FlaskClient, redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str]) -> None:
        """The Procfile's release line, run as Heroku runs it, leaves every old bot registered: no 404 window."""
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # the venv's mammut-sms
        release = subprocess.run(procfile()["release"], shell=True, capture_output=True, text=True, timeout=120,
                                 cwd=ROOT, env={**os.environ, "PATH": path})
        assert 0 == release.returncode, release.stderr
        assert FIRST_SUMMARY == release.stdout.strip().splitlines()[-1]
        text = inbound_params(From=CRIS, To=SALES, Body="hola")
        assert 200 == post_signed(client, text, token=TOKENS[7]).status_code
        assert ["hola"] == [message["body"] for message in inbox(redis, sender=CRIS, bot_id=7)]

    def test_the_release_phase_without_an_old_layout_copies_nothing(
            self, redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str]) -> None:
        """A deployment that never ran the old release only gets its schema."""
        redis.delete("sms:bot:next-id", "sms:bot:ids")
        assert _release(capsys).startswith("database ")
        assert 0 == redis.exists(MIGRATED_KEY)

    def test_a_later_release_phase_says_nothing_of_redis(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Once copied, each deploy's release phase only migrates the schema: the copy is not tried again."""
        _release(capsys)
        assert _release(capsys).startswith("database ")

    def test_old_dead_letter_ids_are_printed_with_their_new_ones(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The id the old `dlq list` showed is mapped to the one `dlq replay` takes now."""
        assert 0 == main(["migrate"])
        assert f"dead letter {OLD_DEAD_ID} is now reply2 (`mammut-sms dlq replay reply2`)" in capsys.readouterr().out

    def test_bots_whose_engine_is_on_a_private_address_are_listed(
            self, redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str]) -> None:
        """A bot whose engine the worker will refuse is named, with ENGINE_ALLOWED_NETWORKS."""
        redis.set("sms:bot:7", json.dumps({**_bot(7, "Sales", SALES), "engine-url": "http://10.1.2.3:8080/bot"}))
        assert 0 == main(["migrate"])
        out = capsys.readouterr().out
        assert ("bot 7: its engine 10.1.2.3 is 10.1.2.3 (private); it answers with its fallback until "
                "ENGINE_ALLOWED_NETWORKS includes that network") in out
        assert "bot 3:" not in out

    def test_a_twilio_retry_of_a_text_the_old_release_accepted_is_a_duplicate(
            self, client: FlaskClient, redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str]) -> None:
        """After the upgrade, Twilio retrying SMin1 (same MessageSid, or same idempotency token) queues
        nothing; a new text is queued as ever."""
        _release(capsys)
        retry = inbound_params(MessageSid="SMin1", From=ANA, To=SUPPORT, Body="hola")
        by_token = inbound_params(From=ANA, To=SUPPORT, Body="hola")
        fresh = inbound_params(From=ANA, To=SUPPORT, Body="otra")
        assert 200 == post_signed(client, retry, token=TOKENS[3]).status_code
        assert 200 == post_signed(client, by_token, token=TOKENS[3],
                                  headers={"I-Twilio-Idempotency-Token": OLD_TOKEN}).status_code
        assert 200 == post_signed(client, fresh, token=TOKENS[3]).status_code
        assert ["otra"] == [message["body"] for message in inbox(redis, sender=ANA, bot_id=3)]
        marks = [redis.ttl(keys.seen(BOT_ACCOUNT_SID, token)) for token in ("SMin1", OLD_TOKEN)]
        assert all(46 * 3600 < ttl <= 47 * 3600 for ttl in marks), marks

    def test_the_old_marks_are_looked_for_though_the_webhook_had_stopped_looking(
            self, client: FlaskClient, redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str]) -> None:
        """The copy writes marks of the earlier shape: the webhook looks for them again until they expire."""
        redis.set(keys.LEGACY_MARKS_UNTIL, int(time.time()) - 1)
        _release(capsys)
        assert int(time.time()) + 59 * 3600 < int(redis.get(keys.LEGACY_MARKS_UNTIL))
        retry = inbound_params(MessageSid="SMin1", From=ANA, To=SUPPORT, Body="hola")
        assert 200 == post_signed(client, retry, token=TOKENS[3]).status_code
        assert [] == inbox(redis, sender=ANA, bot_id=3)

    def test_what_the_new_release_deleted_never_comes_back(
            self, engine: Engine, redis: redis_lib.Redis, client: FlaskClient, twilio: TwilioStandin,
            worker: dramatiq.Worker, broker: dramatiq.Broker, capsys: pytest.CaptureFixture[str]) -> None:
        """A deleted bot, an erased conversation and a replayed dead letter stay gone through later
        runs; the replay is sent once and leaves no phantom dead letter behind."""
        # Given the upgrade's release phase
        _release(capsys)
        # When the new release deletes bot 7, erases Bea's conversation with bot 3 and replays the dead letter
        assert BotStore(engine, redis, Vault([CREDENTIALS_KEY])).delete(7)
        erasure.erase(engine, redis, 3, BEA)
        assert 0 == main(["dlq", "replay", "reply2"])
        assert capsys.readouterr().out.startswith("replayed 1: reply2")
        _sent(twilio, broker)
        # And the copy runs again: the next deploy's release phase, and by hand
        _release(capsys)
        _migrate(capsys)
        # Then nothing came back: bot 7 answers no text, Bea's log and the dead letter stay gone
        assert [3] == [row["id"] for row in _rows(engine, bots)]
        assert 404 == post_signed(client, inbound_params(From=ANA, To=SALES), token=TOKENS[7]).status_code
        assert [] == [row for row in _rows(engine, messages) if row["person"] == BEA]
        assert [] == _rows(engine, dead_letters)
        # And nothing is left to send again: no dead letter is listed, replaying all sends nothing
        assert 0 == main(["dlq", "list", "--json"])
        assert [] == json.loads(capsys.readouterr().out)
        assert 0 == main(["dlq", "replay", "--all"])
        assert "nothing replayed" in capsys.readouterr().out
        assert ["adiós"] == _sent(twilio, broker)


def _sent(twilio: TwilioStandin, broker: dramatiq.Broker) -> list[str]:
    """The texts Twilio was asked to send to Ana, once the worker has nothing left to do."""
    for queue in (CONVERSATIONS_QUEUE, OUTBOUND_QUEUE):
        broker.join(queue, timeout=30_000)
    return [message.body for message in twilio.messages if message.to == ANA]


@pytest.mark.usefixtures("old_layout", "environment")
def test_purge_deletes_the_old_keys_once_copied(redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    """--purge-redis refuses before the copy; after it, the old keys (engine URLs with their keys) are gone,
    the carried dedupe marks and the migration's mark stay."""
    # Given an old layout the release phase did not copy (no registry counter: it did not look)
    redis.delete("sms:bot:next-id", "sms:bot:ids")
    assert "not copied yet" in _refused(capsys, "--purge-redis")
    assert 1 == redis.exists("sms:bot:3")
    # When it is copied, then purged
    redis.set("sms:bot:next-id", 7)
    _release(capsys)
    assert _migrate(capsys, "--purge-redis").startswith("deleted ")
    # Then no engine URL's key, old bot, opt-out set or old dedupe mark is left
    assert [] == [key for key in redis.keys("*") if "s3cret" in (redis.get(key) if redis.type(key) == "string" else "")]
    assert [] == redis.keys("sms:bot:*") + redis.keys("sms:optout:*") + redis.keys("sms:seen:SM*")
    assert (1, 1) == (redis.exists(MIGRATED_KEY), redis.exists(keys.seen(BOT_ACCOUNT_SID, "SMin1")))


@pytest.mark.parametrize(("environment_name", "status"), [("development", 0), ("production", 1)])
def test_an_unreachable_redis_stops_the_release_phase_outside_development(
        monkeypatch: pytest.MonkeyPatch, database: str, capsys: pytest.CaptureFixture[str],
        environment_name: str, status: int) -> None:
    """The release phase cannot tell whether old bots wait in a Redis it cannot reach: in production it
    fails (the new processes would start without them); in development it says so and goes on."""
    for name, value in {"DATABASE_URL": database, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                        "MAMMUT_SMS_ENV": environment_name, "CREDENTIALS_KEY": CREDENTIALS_KEY,
                        "ADMIN_API_TOKEN": "t"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    assert status == main(["migrate"])
    said = capsys.readouterr()
    assert "not reachable: no earlier release's data looked for" in said.out if status == 0 else \
        "mammut-sms migrate: Redis at redis://127.0.0.1" in said.err


def test_bots_copied_after_the_registry_copy_was_built_are_routed(
        old_layout: None, environment: None, store: BotStore, capsys: pytest.CaptureFixture[str]) -> None:
    """A process that built the registry's copy (in Redis) before the copy ran finds every copied bot after it."""
    assert store.copied(number_route(SALES)) is None  # the registry's copy, built from a database without bots

    _migrate(capsys)

    assert 7 == store.copied(number_route(SALES)).id
