"""POST /channels/sms/callback/<bot-id>: replies an engine sends later join the outbound path in order."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis as redis_lib
from flask.testing import FlaskClient

from shared import keys, messagelog
from shared.db import get_engine, transaction
from shared.settings import Settings
from tests.conftest import ADMIN_TOKEN, BOT_ACCOUNT_SID, BOT_AUTH_TOKEN
from tests.support.messagelog import log_written
from shared.bots import Bot, BotStore

RECIPIENT, OTHER = "+15551230001", "+15551230002"


@pytest.fixture
def bot(bot: Bot, store: BotStore) -> Bot:
    """Most tests here are about the callback's path, not the push window: this bot may push to anyone."""
    return store.update(bot.id, {"allow-cold-push": True})


def url(bot_id: int) -> str:
    return f"/channels/sms/callback/{bot_id}"


def queued(redis: redis_lib.Redis, bot: Bot, recipient: str) -> list[dict[str, Any]]:
    conversation = keys.conversation_id(bot.id, recipient)
    ids = redis.lrange(keys.outbox(conversation), 0, -1)
    return [json.loads(raw) for raw in redis.hmget(keys.replies(conversation), ids)] if ids else []


def delivery_kicks(redis: redis_lib.Redis) -> list[list[Any]]:
    """The arguments of every send_reply message waiting on Dramatiq's outbound queue."""
    ids = redis.lrange("dramatiq:outbound", 0, -1)
    bodies = redis.hmget("dramatiq:outbound.msgs", ids) if ids else []
    return [json.loads(body)["args"] for body in bodies if body]


def test_one_reply_object_is_queued_logged_and_kicked(client: FlaskClient, admin_headers: dict[str, str], bot: Bot,
                                                      redis: redis_lib.Redis, settings: Settings) -> None:
    """The object Rasa's callback channel posts becomes one queued reply, in the log, with a send kicked."""
    response = client.post(url(bot.id), headers=admin_headers,
                           json={"recipient_id": RECIPIENT, "text": "más tarde", "image": "https://img.example/a.png"})

    assert (202, "Success") == (response.status_code, response.json["status"])
    [reply] = queued(redis, bot, RECIPIENT)
    assert (RECIPIENT, "más tarde", "https://img.example/a.png") == (reply["to"], reply["text"], reply["media_url"])
    conversation = keys.conversation_id(bot.id, RECIPIENT)
    log_written(redis, get_engine(settings))  # the log's record went with the replies, through Redis
    log = client.get(f"/app:mammut-1/graph/user:{bot.id}/messages", query_string={"with": RECIPIENT},
                     headers=admin_headers).json["data"]["messages"]
    assert [("out", "más tarde", "callback")] == [(e["direction"], e["text"], e["origin"]) for e in log]
    assert [[conversation, reply["id"]]] == delivery_kicks(redis)


def test_a_list_is_queued_per_recipient_in_the_order_given(client: FlaskClient, admin_headers: dict[str, str],
                                                           bot: Bot, redis: redis_lib.Redis) -> None:
    """Replies to several recipients keep their order within each recipient's conversation."""
    body = [
        {"recipient_id": RECIPIENT, "text": "uno"},
        {"recipient_id": OTHER, "text": "a"},
        {"recipient_id": RECIPIENT, "text": "dos"},
        {"recipient_id": RECIPIENT, "text": "tres"},
    ]

    response = client.post(url(bot.id), headers=admin_headers, json=body)

    assert 202 == response.status_code
    assert 4 == response.json["data"]["queued"]
    assert ["uno", "dos", "tres"] == [reply["text"] for reply in queued(redis, bot, RECIPIENT)]
    assert ["a"] == [reply["text"] for reply in queued(redis, bot, OTHER)]
    # One kick per conversation starts its chain of sends.
    assert 2 == len(delivery_kicks(redis))


def test_a_long_reply_is_split_into_several_messages(client: FlaskClient, admin_headers: dict[str, str], bot: Bot,
                                                     redis: redis_lib.Redis) -> None:
    """Text over 1600 characters is queued as several messages, in order."""
    text = " ".join(["palabra"] * 500)

    client.post(url(bot.id), headers=admin_headers, json={"recipient_id": RECIPIENT, "text": text})

    parts = [reply["text"] for reply in queued(redis, bot, RECIPIENT)]
    assert len(parts) == 3 and all(len(part) <= 1600 for part in parts)
    assert text.split() == " ".join(parts).split()


def test_a_missing_or_wrong_token_is_refused(client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
    """Only the holder of the admin bearer token may make the bot speak."""
    body = {"recipient_id": RECIPIENT, "text": "hi"}

    statuses = [
        client.post(url(bot.id), json=body).status_code,
        client.post(url(bot.id), json=body, headers={"Authorization": "Bearer wrong"}).status_code,
    ]

    assert [401, 401] == statuses
    assert [] == queued(redis, bot, RECIPIENT)


def test_an_unknown_bot_is_not_found(client: FlaskClient, admin_headers: dict[str, str], bot: Bot) -> None:
    """A bot id nobody registered answers 404."""
    response = client.post(url(bot.id + 1), headers=admin_headers, json={"recipient_id": RECIPIENT, "text": "hi"})

    assert 404 == response.status_code


def test_a_recipient_that_is_not_e164_is_a_bad_request_naming_the_field(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis) -> None:
    """A recipient_id such as a Rasa sender id that is not a phone number is refused, saying which field."""
    response = client.post(url(bot.id), headers=admin_headers, json=[
        {"recipient_id": RECIPIENT, "text": "fine"}, {"recipient_id": "default", "text": "not a number"},
    ])

    assert 400 == response.status_code
    assert "1.recipient_id" in response.json["message"] and "E.164" in response.json["message"]
    assert [] == queued(redis, bot, RECIPIENT)  # nothing of a refused request is queued


def test_malformed_bodies_are_bad_requests(client: FlaskClient, admin_headers: dict[str, str], bot: Bot) -> None:
    """Not JSON, an empty list, a reply with nothing to send, or no recipient: 400 each."""
    bodies: list[dict[str, Any]] = [
        {"data": "not json", "content_type": "application/json"},
        {"json": []},
        {"json": {"recipient_id": RECIPIENT}},
        {"json": {"text": "to whom?"}},
    ]

    statuses = [client.post(url(bot.id), headers=admin_headers, **body).status_code for body in bodies]

    assert [400, 400, 400, 400] == statuses


class TestTrust:
    """Who may push, to whom, and how much: an engine is not trusted with more than its own bot."""

    def test_a_bots_engine_token_works_for_its_own_callback_only(
            self, client: FlaskClient, store: BotStore, bot: Bot, redis: redis_lib.Redis) -> None:
        """The token shown when the bot is created authorizes its callback; not another bot's, not the registry."""
        created = client.post("/app:mammut-1/graph/user", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, json={
            "user-type": "machine", "name": "second", "twilio-account-sid": BOT_ACCOUNT_SID,
            "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": "+15005550123", "allow-cold-push": True,
        }).json["taskResult"][0]
        token, second = created["engine-token"], created["affectedElementId"]
        engine = {"Authorization": f"Bearer {token}"}
        reply = {"recipient_id": RECIPIENT, "text": "hola"}
        assert 202 == client.post(url(second), headers=engine, json=reply).status_code
        assert 401 == client.post(url(bot.id), headers=engine, json=reply).status_code
        assert 401 == client.get("/app:mammut-1/graph/user", headers=engine).status_code
        assert "engine-token" not in json.dumps(client.get(f"/app:mammut-1/graph/user:{second}",
                                                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json)

    def test_a_rotated_token_replaces_the_old_one(self, client: FlaskClient, store: BotStore, bot: Bot) -> None:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        _, old = store.create_with_token({"name": "third", "twilio-account-sid": BOT_ACCOUNT_SID,
                                          "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": "+15005550124",
                                          "allow-cold-push": True})
        third = store.by_number("+15005550124")
        assert third is not None
        new = client.post(f"/app:mammut-1/graph/user:{third.id}/engine-token", headers=admin).json["taskResult"][0]
        reply = {"recipient_id": RECIPIENT, "text": "hola"}
        assert 401 == client.post(url(third.id), headers={"Authorization": f"Bearer {old}"}, json=reply).status_code
        assert 202 == client.post(url(third.id), headers={"Authorization": f"Bearer {new['engine-token']}"},
                                  json=reply).status_code

    def test_pushes_go_only_to_people_who_wrote_within_the_window(
            self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore, bot: Bot,
            redis: redis_lib.Redis, settings: Settings) -> None:
        """A person who texted the bot may get a push; a list naming anyone who never wrote is refused whole."""
        bot = store.update(bot.id, {"allow-cold-push": False})
        with transaction(get_engine(settings)) as connection:
            messagelog.record_exchange(connection, {
                "sid": "SMwrote", "bot_id": bot.id, "sender": RECIPIENT, "to": bot.number, "body": "hola", "media": [],
                "received_at": time.time() - 3600}, [], bot.number)
        assert 202 == client.post(url(bot.id), headers=admin_headers,
                                  json={"recipient_id": RECIPIENT, "text": "un recordatorio"}).status_code
        refused = client.post(url(bot.id), headers=admin_headers, json=[
            {"recipient_id": RECIPIENT, "text": "a"}, {"recipient_id": OTHER, "text": "b"}])
        assert (403, [OTHER]) == (refused.status_code, refused.json["errors"]["recipient_id"])
        assert ["un recordatorio"] == [reply["text"] for reply in queued(redis, bot, RECIPIENT)]
        assert [] == queued(redis, bot, OTHER)

    def test_a_list_of_more_than_a_hundred_replies_is_refused(
            self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis) -> None:
        body = [{"recipient_id": RECIPIENT, "text": f"n{n}"} for n in range(101)]
        assert 413 == client.post(url(bot.id), headers=admin_headers, json=body).status_code
        assert [] == queued(redis, bot, RECIPIENT)
