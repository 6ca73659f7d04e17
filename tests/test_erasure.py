"""DELETE /app:<app>/graph/user:<id>/conversations/<E.164>: one person's data erased on request."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import dramatiq
import redis as redis_lib
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from cli.twilio_standin import TwilioStandin
from shared import db, deadletters, keys, messagelog, optout
from shared.bots import Bot
from shared.conversations import accept_inbound, new_reply, queue_replies
from shared.schema import conversations, deliveries, handoffs, messages
from tests.support.fake_engine import FakeEngine
from tests.support.messagelog import log_written
from tests.test_message_log import OTHER, PERSON, engine_bot, exchange, inbound, sql  # noqa: F401 (fixture)
from tests.test_outbound import wait_until
from tests.test_signature import inbound_params, post_signed
from worker.logdrain import exchange_record

API = "/app:mammut-1/graph/user"


def count(engine: Engine, table: object, **where: object) -> int:
    query = select(func.count()).select_from(table)  # type: ignore[arg-type]
    for column, value in where.items():
        query = query.where(getattr(table.c, column) == value)  # type: ignore[attr-defined]
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def test_a_persons_messages_statuses_dead_letters_and_queue_are_erased_and_others_kept(
        client: FlaskClient, admin_headers: dict[str, str], redis: redis_lib.Redis, bot: Bot,
        sql: Engine) -> None:  # noqa: F811
    # Given a logged exchange with a delivery status, a dead letter, a queued reply and an opt-out for the
    # person, and another person's exchange
    sent = exchange(sql, bot, "hola", "buenas", person=PERSON)
    exchange(sql, bot, "hi", "hello", person=OTHER)
    with db.transaction(sql) as connection:
        messagelog.record_sent(connection, f"{sent['sid']}-0", "SMsent0", "queued")
        messagelog.record_delivery(connection, "SMsent0", bot.id, "delivered")
        deadletters.record(connection, {"id": "dead-1", "bot_id": bot.id, "person": PERSON, "text": "lost",
                                        "reason": "permanent", "attempts": 1, "failed_at": 1.0})
        optout.record(connection, bot.number, PERSON, True, "keyword STOP")
    conversation = keys.conversation_id(bot.id, PERSON)
    queue_replies(redis, conversation, [new_reply(conversation, PERSON, "not yet sent")])

    # When the operator erases the person's conversation
    response = client.delete(f"{API}:{bot.id}/conversations/{quote(PERSON)}", headers=admin_headers)

    # Then their rows and queue are gone, the other person's and the opt-out are kept
    assert (200, {"messages": 2, "dead-letters": 1, "queued": 1}) == (
        response.status_code, response.get_json()["data"]["erased"])
    assert (0, 0, 0) == (count(sql, messages, person=PERSON), count(sql, conversations, person=PERSON),
                         count(sql, deliveries, sid="SMsent0"))
    assert (2, 1) == (count(sql, messages, person=OTHER), count(sql, conversations, person=OTHER))
    assert [] == redis.keys(f"*{PERSON}*outbox*") == redis.keys(f"*{PERSON}*replies*")
    with sql.connect() as connection:
        assert optout.read(connection, bot.number, PERSON).opted_out


def test_a_record_still_on_its_way_to_the_database_is_not_written_after_the_erase(
        client: FlaskClient, admin_headers: dict[str, str], redis: redis_lib.Redis, bot: Bot,
        sql: Engine) -> None:  # noqa: F811
    """The log's records pass through Redis: one waiting there when the erase comes is dropped, while a
    message that arrives after the erase is logged as usual."""
    before = inbound(bot, "before the erase")
    redis.rpush(keys.LOG_OUTBOX, exchange_record(before, [], bot.number))
    assert 200 == client.delete(f"{API}:{bot.id}/conversations/{quote(PERSON)}", headers=admin_headers).status_code
    after = inbound(bot, "after the erase")
    redis.rpush(keys.LOG_OUTBOX, exchange_record(after, [], bot.number))

    log_written(redis, sql)

    with sql.connect() as connection:
        assert ["after the erase"] == list(connection.execute(
            select(messages.c.text).where(messages.c.person == PERSON)).scalars())


def test_nothing_queued_for_the_person_is_answered_after_the_erase(
        client: FlaskClient, admin_headers: dict[str, str], redis: redis_lib.Redis, bot: Bot) -> None:
    assert accept_inbound(redis, inbound(bot, "waiting"))
    assert 200 == client.delete(f"{API}:{bot.id}/conversations/{quote(PERSON)}", headers=admin_headers).status_code
    conversation = keys.conversation_id(bot.id, PERSON)
    assert (0, None) == (redis.llen(keys.inbox(conversation)), redis.zscore(keys.PENDING, conversation))


def test_a_bad_number_or_bot_or_token_is_refused(client: FlaskClient, admin_headers: dict[str, str],
                                                 bot: Bot) -> None:
    assert 400 == client.delete(f"{API}:{bot.id}/conversations/alice", headers=admin_headers).status_code
    assert 404 == client.delete(f"{API}:999/conversations/{quote(PERSON)}", headers=admin_headers).status_code
    assert 401 == client.delete(f"{API}:{bot.id}/conversations/{quote(PERSON)}").status_code


def test_a_text_a_dead_worker_left_in_processing_is_not_answered_after_the_erase(
        client: FlaskClient, admin_headers: dict[str, str], redis: redis_lib.Redis, engine_bot: Bot,  # noqa: F811
        engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
    """A worker that died mid-message leaves the text in the processing list: the erase empties it, so the
    person's next text is the only one the engine ever sees."""
    # Given a text a worker took from the inbox and died on (its lease long gone)
    conversation = keys.conversation_id(engine_bot.id, PERSON)
    redis.rpush(keys.processing(conversation), json.dumps(inbound(engine_bot, "left behind")))
    redis.zadd(keys.PENDING, {conversation: time.time()})
    # When the conversation is erased and the person then texts again
    erased = client.delete(f"{API}:{engine_bot.id}/conversations/{quote(PERSON)}", headers=admin_headers)
    assert accept_inbound(redis, inbound(engine_bot, "nuevo"))
    # Then only the new text reaches the engine and is answered
    twilio.wait_for(1, timeout=30)
    time.sleep(0.5)  # room for a second answer, were one coming
    assert (1, ["nuevo"], ["reply to nuevo"]) == (
        erased.get_json()["data"]["erased"]["queued"], [call.text for call in engine.calls],
        [message.body for message in twilio.messages])


def test_an_answer_the_engine_gives_after_the_erase_is_neither_sent_nor_logged(
        client: FlaskClient, admin_headers: dict[str, str], redis: redis_lib.Redis, engine_bot: Bot,  # noqa: F811
        engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker, sql: Engine,  # noqa: F811
        logs: list[dict[str, object]]) -> None:
    """A 3 s engine, the conversation erased 1 s into the call: its answer never reaches Twilio, and
    nothing of the exchange is in the database afterwards, not even the handoff the answer asked for."""
    def answer(payload: dict[str, object]) -> list[dict[str, object]]:
        return [{"recipient_id": payload["sender"], "text": "tarde"}, {"custom": {"handoff": True, "note": "nota"}}]

    # Given a text the engine is answering slowly
    engine.delay, engine.answer = 3.0, answer
    assert 200 == post_signed(client, inbound_params(From=PERSON, Body="borra esto")).status_code
    engine.wait_for_calls(1)
    time.sleep(1.0)
    # When the person's conversation is erased meanwhile
    assert 200 == client.delete(f"{API}:{engine_bot.id}/conversations/{quote(PERSON)}",
                                headers=admin_headers).status_code
    # Then, once the engine has answered, nothing is sent and nothing is logged
    wait_until(lambda: any(event["event"] in ("conversation.erased_meanwhile", "conversation.answered")
                           for event in logs), timeout=15, what="the engine's answer handled")
    time.sleep(1.0)
    log_written(redis, sql)
    assert [] == [message.body for message in twilio.messages if message.to == PERSON]
    assert (0, 0, 0) == (count(sql, messages, person=PERSON), count(sql, conversations, person=PERSON),
                         count(sql, handoffs, person=PERSON))


def test_the_persons_records_the_database_refused_are_erased_and_others_kept(
        client: FlaskClient, admin_headers: dict[str, str], redis: redis_lib.Redis, bot: Bot) -> None:
    """Records set aside in sms:log:refused hold the person's texts: the erase takes theirs away."""
    theirs, others = (exchange_record(inbound(bot, "mine", person=person), [], bot.number) for person in (PERSON, OTHER))
    redis.rpush(keys.LOG_REFUSED, theirs, others)
    assert 200 == client.delete(f"{API}:{bot.id}/conversations/{quote(PERSON)}", headers=admin_headers).status_code
    assert [OTHER] == [json.loads(raw)["message"]["sender"] for raw in redis.lrange(keys.LOG_REFUSED, 0, -1)]
