"""POST /app:<app>/graph/user:<id>/messages: an operator texts a person as the bot, without the engine."""

from __future__ import annotations

import dramatiq
import redis as redis_lib
from flask.testing import FlaskClient

from cli.twilio_standin import TwilioStandin
from shared import keys, optout
from shared.bots import Bot, BotStore
from shared.db import get_engine
from shared.settings import Settings
from shared.conversations import new_reply, queue_replies

PERSON = "+15551230001"


def url(bot: Bot) -> str:
    return f"/app:mammut-1/graph/user:{bot.id}/messages"


def test_an_operators_message_is_sent_after_the_replies_already_queued_and_logged_as_operator(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis,
        twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
    # Given an engine's reply already waiting for the person
    conversation = keys.conversation_id(bot.id, PERSON)
    queue_replies(redis, conversation, [new_reply(conversation, PERSON, "the engine's")])

    # When the operator sends a message as the bot (the queued reply is kicked by nobody else: the
    # operator's send finds the outbox busy, and the reply ahead goes first once kicked)
    response = client.post(url(bot), headers=admin_headers, json={"to": PERSON, "text": "hola, soy Ana"})
    from shared.tasks import kick_delivery

    kick_delivery(conversation, redis.lindex(keys.outbox(conversation), 0))

    # Then both go, in order, and the log says who wrote the second
    assert 202 == response.status_code
    [reply_id] = response.get_json()["data"]["queued"]
    twilio.wait_for(2, timeout=30)
    assert ["the engine's", "hola, soy Ana"] == [m.body for m in twilio.messages]
    log = client.get(f"/app:mammut-1/graph/user:{bot.id}/messages?with=%2B15551230001",
                     headers=admin_headers).get_json()["data"]["messages"]
    assert [("out", "operator")] == [(e["direction"], e["origin"]) for e in log if e["id"] == reply_id]


def test_a_retried_request_with_the_same_idempotency_key_queues_nothing_new(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis) -> None:
    headers = {**admin_headers, "Idempotency-Key": "reminder-42"}
    first = client.post(url(bot), headers=headers, json={"to": PERSON, "text": "tu cita es mañana"})
    again = client.post(url(bot), headers=headers, json={"to": PERSON, "text": "tu cita es mañana"})
    other = client.post(url(bot), headers={**admin_headers, "Idempotency-Key": "reminder-43"},
                        json={"to": PERSON, "text": "otra"})
    assert (202, 202, 202) == (first.status_code, again.status_code, other.status_code)
    assert first.get_json() == again.get_json()
    assert 2 == redis.llen(keys.outbox(keys.conversation_id(bot.id, PERSON)))


def test_a_refused_request_frees_its_idempotency_key_for_the_corrected_retry(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis) -> None:
    """A request refused for a bad number queued nothing: its corrected retry with the same key is queued."""
    headers = {**admin_headers, "Idempotency-Key": "reminder-44"}
    refused = client.post(url(bot), headers=headers, json={"to": "alice", "text": "tu cita es mañana"})
    corrected = client.post(url(bot), headers=headers, json={"to": PERSON, "text": "tu cita es mañana"})
    assert (400, 202) == (refused.status_code, corrected.status_code)
    assert 1 == redis.llen(keys.outbox(keys.conversation_id(bot.id, PERSON)))


def test_an_opted_out_person_a_bad_number_or_nothing_to_send_is_refused(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis,
        settings: object) -> None:
    from shared.db import get_engine

    optout.opt_out(get_engine(settings), redis, bot.number, PERSON, how="keyword STOP")  # type: ignore[arg-type]
    refused = {
        "opted out": client.post(url(bot), headers=admin_headers, json={"to": PERSON, "text": "hola"}),
        "bad number": client.post(url(bot), headers=admin_headers, json={"to": "alice", "text": "hola"}),
        "empty": client.post(url(bot), headers=admin_headers, json={"to": "+15551230002", "text": "  "}),
        "file media": client.post(url(bot), headers=admin_headers,
                                  json={"to": "+15551230002", "media-url": "file:///etc/passwd"}),
        "no token": client.post(url(bot), json={"to": "+15551230002", "text": "hola"}),
    }
    assert {"opted out": 409, "bad number": 400, "empty": 400, "file media": 400, "no token": 401} == {
        name: response.status_code for name, response in refused.items()}
    assert "opted out" in refused["opted out"].get_json()["message"]
    assert [] == redis.keys(f"*{PERSON}*outbox*")



def test_a_person_who_opted_out_of_the_pool_number_they_texted_is_refused(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, store: BotStore, redis: redis_lib.Redis,
        settings: Settings) -> None:
    """A bot with several numbers sends from the one the person texted: their STOP to it refuses the send (409)."""
    # Given a person who texted the bot's second number, then STOP to it
    pool_number = "+15550012078"
    pooled = store.update(bot.id, {"phone-numbers": [pool_number]})
    redis.set(keys.texted(keys.conversation_id(pooled.id, PERSON)), pool_number)
    optout.opt_out(get_engine(settings), redis, pool_number, PERSON, how="keyword STOP")

    # When an operator writes to them
    sent = client.post(url(pooled), headers=admin_headers, json={"to": PERSON, "text": "hola"})

    # Then nothing is queued
    assert (409, ["opted out"]) == (sent.status_code, sent.get_json()["errors"]["to"])
    assert 0 == redis.llen(keys.outbox(keys.conversation_id(pooled.id, PERSON)))


def test_a_number_the_bot_no_longer_has_is_not_what_the_send_is_checked_against(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, store: BotStore, redis: redis_lib.Redis,
        settings: Settings) -> None:
    """The person last texted a number since taken off the bot: the send goes from the main number (as
    the worker sends it), so a STOP to the main number refuses it, whatever the old number's scope says."""
    old_number = "+15550012079"
    pooled = store.update(bot.id, {"phone-numbers": [old_number, "+15550012080"]})
    redis.set(keys.texted(keys.conversation_id(pooled.id, PERSON)), old_number)
    pooled = store.update(bot.id, {"phone-numbers": ["+15550012080"]})  # the old number is gone
    optout.opt_out(get_engine(settings), redis, pooled.number, PERSON, how="keyword STOP")

    sent = client.post(url(pooled), headers=admin_headers, json={"to": PERSON, "text": "hola"})

    assert (409, ["opted out"]) == (sent.status_code, sent.get_json()["errors"]["to"])


def test_running_the_same_send_again_texts_once(live_server: str, bot: Bot, redis: redis_lib.Redis) -> None:
    """The key comes from the content: a re-run after a timeout queues nothing new; another key, or
    another text, does."""
    from cli.main import main
    from tests.conftest import ADMIN_TOKEN

    command = ["send", "--url", live_server, "--token", ADMIN_TOKEN, "--bot", str(bot.id), "--to", PERSON]
    outbox = keys.outbox(keys.conversation_id(bot.id, PERSON))
    assert 0 == main([*command, "¿llegó?"]) == main([*command, "¿llegó?"])
    assert 1 == redis.llen(outbox)
    assert 0 == main([*command, "¿llegó?", "--idempotency-key", "again-1"]) == main([*command, "otra cosa"])
    assert 3 == redis.llen(outbox)


def test_the_cli_sends_as_the_bot(live_server: str, bot: Bot, redis: redis_lib.Redis,
                                  capsys: object) -> None:
    from cli.main import main
    from tests.conftest import ADMIN_TOKEN

    assert 0 == main(["send", "--url", live_server, "--token", ADMIN_TOKEN, "--bot", str(bot.id), "--to", PERSON,
                      "hola desde la terminal"])
    assert 1 == redis.llen(keys.outbox(keys.conversation_id(bot.id, PERSON)))
