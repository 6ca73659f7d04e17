"""POST /channels/sms/callback/<bot-id>: replies an engine sends later join the outbound path in order."""

from __future__ import annotations

import json
from typing import Any

import redis as redis_lib
from flask.testing import FlaskClient

from shared import keys
from shared.bots import Bot

RECIPIENT, OTHER = "+15551230001", "+15551230002"


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
                                                      redis: redis_lib.Redis) -> None:
    """The object Rasa's callback channel posts becomes one queued reply, in the log, with a send kicked."""
    response = client.post(url(bot.id), headers=admin_headers,
                           json={"recipient_id": RECIPIENT, "text": "más tarde", "image": "https://img.example/a.png"})

    assert (202, "Success") == (response.status_code, response.json["status"])
    [reply] = queued(redis, bot, RECIPIENT)
    assert (RECIPIENT, "más tarde", "https://img.example/a.png") == (reply["to"], reply["text"], reply["media_url"])
    conversation = keys.conversation_id(bot.id, RECIPIENT)
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
