"""NUL and other control characters in every text that enters: removed, never a 500, and never a
reason to lose an exchange from the record (PostgreSQL refuses a NUL in text and in JSON)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import dramatiq
import redis as redis_lib
from flask.testing import FlaskClient
from sqlalchemy import Engine

from cli.twilio_standin import TwilioStandin
from shared import keys, messagelog
from shared.bots import Bot, BotStore
from tests.conftest import BOT_ACCOUNT_SID, BOT_AUTH_TOKEN
from tests.support.fake_engine import FakeEngine
from tests.support.messagelog import log_written
from tests.test_message_log import PERSON, sql  # noqa: F401 (fixture)
from tests.test_signature import inbound_params, post_signed

USERS = "/app:mammut-1/graph/user"
DIRTY = "a\u0000b\u001b[2Jc\u007f"  # a NUL, a terminal escape, a DEL
CLEAN = "ab[2Jc"


def log_of(redis: redis_lib.Redis, sql: Engine, bot: Bot) -> list[tuple[str, str]]:  # noqa: F811
    log_written(redis, sql)
    with sql.connect() as connection:
        return [(entry["direction"], entry["text"]) for entry in messagelog.read(connection, bot.id, PERSON).items]


def test_registry_text_fields_lose_their_control_characters(client: FlaskClient, admin_headers: dict[str, str],
                                                           database: str) -> None:
    """A bot's name, fallback-message and a user field with a NUL: stored and shown without it, on
    create and on update."""
    fields = {"user-type": "machine", "twilio-account-sid": BOT_ACCOUNT_SID, "twilio-auth-token": BOT_AUTH_TOKEN,
              "main-phone-number": "+15550013001", "name": DIRTY, "fallback-message": DIRTY, "team": DIRTY}
    created = client.post(USERS, headers=admin_headers, json=fields)
    assert 200 == created.status_code, created.json
    bot_id = created.json["taskResult"][0]["affectedElementId"]
    updated = client.post(f"{USERS}:{bot_id}", headers=admin_headers,
                          json={"name": "x" + DIRTY, "fallback-message": "x" + DIRTY, "team": "x" + DIRTY})
    assert 200 == updated.status_code, updated.json
    shown = client.get(f"{USERS}:{bot_id}", headers=admin_headers).json["data"]["user"][0]
    assert ["x" + CLEAN] * 3 == [shown["name"], shown["fallback-message"], shown["team"]]


def test_a_handoff_note_loses_its_control_characters(client: FlaskClient, admin_headers: dict[str, str],
                                                    bot: Bot) -> None:
    paused = client.post(f"{USERS}:{bot.id}/conversations/{quote(PERSON)}/handoff", headers=admin_headers,
                         json={"note": DIRTY})
    assert (200, CLEAN) == (paused.status_code, paused.json["data"]["handoff"]["note"])
    listed = client.get(f"{USERS}:{bot.id}/conversations", headers=admin_headers)
    assert 200 == listed.status_code


def test_an_operator_send_and_an_engine_callback_are_sent_and_logged_without_them(
        client: FlaskClient, admin_headers: dict[str, str], store: BotStore, bot: Bot, redis: redis_lib.Redis,
        twilio: TwilioStandin, worker: dramatiq.Worker, sql: Engine) -> None:  # noqa: F811
    bot = store.update(bot.id, {"allow-cold-push": True, "messages-per-second": 50})
    sent = client.post(f"{USERS}:{bot.id}/messages", headers=admin_headers, json={"to": PERSON, "text": "op " + DIRTY})
    pushed = client.post(f"/channels/sms/callback/{bot.id}", headers=admin_headers,
                         json={"recipient_id": PERSON, "text": "cb " + DIRTY})
    assert (202, 202) == (sent.status_code, pushed.status_code), (sent.json, pushed.json)
    assert ["op " + CLEAN, "cb " + CLEAN] == [message.body for message in twilio.wait_for(2)]
    assert [("out", "op " + CLEAN), ("out", "cb " + CLEAN)] == log_of(redis, sql, bot)


def test_an_engine_answer_with_a_nul_is_sent_and_logged_whole_without_it(
        client: FlaskClient, admin_headers: dict[str, str], store: BotStore, bot: Bot, engine: FakeEngine, redis: redis_lib.Redis,
        twilio: TwilioStandin, worker: dramatiq.Worker, sql: Engine) -> None:  # noqa: F811
    """The exchange (the inbound included) reaches the database, and the handoff the answer asked for
    with it; nothing is set aside as refused."""
    def answer(payload: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"recipient_id": payload["sender"], "text": DIRTY},
                {"custom": {"handoff": True, "note": "nota" + DIRTY}}]

    engine.answer = answer
    bot = store.update(bot.id, {"engine-url": engine.url, "messages-per-second": 50})
    assert 200 == post_signed(client, inbound_params(From=PERSON, Body="hola")).status_code
    [message] = twilio.wait_for(1)
    assert CLEAN == message.body
    assert [("in", "hola"), ("out", CLEAN)] == log_of(redis, sql, bot)
    assert 0 == redis.llen(keys.LOG_REFUSED)
    [listed] = client.get(f"{USERS}:{bot.id}/conversations", headers=admin_headers).json["data"]["conversations"]
    assert "nota" + CLEAN == listed["handoff"]["note"]
