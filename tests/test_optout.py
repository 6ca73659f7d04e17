"""Opt-out: which inbound texts opt a person out or back in, and that the database's record of it holds
when Redis loses everything, while the send path never queries the database for it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis as redis_lib
from flask.testing import FlaskClient
from sqlalchemy import Engine, event

from cli.twilio_standin import TwilioStandin
from shared import keys, optout
from shared.bots import Bot, BotStore
from shared.conversations import new_reply, queue_replies
from shared.db import get_engine, transaction
from shared.optout import MESSAGE, OPT_IN, OPT_OUT, classify
from shared.settings import Settings
from tests.support.fake_engine import FakeEngine
from tests.test_outbound import ALICE, BOB, bodies_to, make_bot, outbox_empty, send, wait_until
from tests.test_signature import inbound_params, post_signed
from tests.test_status_callbacks import callback, post_status

# The keywords the README promises, spelled as people type them.
OPT_OUT_WORDS = ["STOP", "stopall", "Unsubscribe", "CANCEL", "end", "Quit", "REVOKE", "optout"]
OPT_IN_WORDS = ["START", "Yes", "unstop"]


@pytest.mark.parametrize("body", OPT_OUT_WORDS)
def test_each_opt_out_keyword_alone_is_an_opt_out(body: str) -> None:
    """Every opt-out keyword, in any case and with stray spaces around it, opts the sender out."""
    assert (OPT_OUT, OPT_OUT) == (classify(body), classify(f"  {body}\n"))


@pytest.mark.parametrize("body", OPT_IN_WORDS)
def test_each_opt_in_keyword_alone_is_an_opt_in(body: str) -> None:
    """Every opt-in keyword, in any case and with stray spaces around it, opts the sender back in."""
    assert (OPT_IN, OPT_IN) == (classify(body), classify(f" {body} "))


@pytest.mark.parametrize("body", ["stop it", "yes please", "STOP NOW!", "HELP me", "", None])
def test_anything_else_is_an_ordinary_message(body: str | None) -> None:
    """Only the whole body counts: a keyword inside a sentence, or no text at all, is a message."""
    assert MESSAGE == classify(body)


@pytest.mark.parametrize(("body", "opt_out_type", "expected"), [
    ("START", "STOP", OPT_OUT), ("STOP", "start", OPT_IN), ("hola", "STOP", OPT_OUT), ("STOP", "HELP", OPT_OUT),
])
def test_twilios_opt_out_type_wins_over_the_body(body: str, opt_out_type: str, expected: str) -> None:
    """OptOutType STOP or START (Twilio's Advanced Opt-Out) decides; any other value leaves it to the body."""
    assert expected == classify(body, opt_out_type)


# --- The record: the database, with a Redis copy for the fast paths ------------------------

SENDER = "+15551230001"  # inbound_params' From


@pytest.fixture
def sql(settings: Settings) -> Engine:
    """The engine the app and the in-process worker share (one per database URL)."""
    return get_engine(settings)


@pytest.fixture
def engine_bot(bot: Bot, store: BotStore, engine: FakeEngine) -> Bot:
    """The test bot, answering through a fake engine ("reply to <text>")."""
    return store.update(bot.id, {"engine-url": engine.url, "messages-per-second": 50.0})


def state(sql: Engine, bot: Bot, person: str) -> tuple[bool, str] | None:
    with sql.connect() as connection:
        row = optout.read(connection, bot.number, person)
    return (row.opted_out, row.how) if row else None


def text_and_wait(client: FlaskClient, sql: Engine, bot: Bot, body: str, expected: tuple[bool, str]) -> None:
    """Text `body` to the bot as the sender, and wait until the worker has recorded it."""
    assert 200 == post_signed(client, inbound_params(Body=body)).status_code
    wait_until(lambda: state(sql, bot, SENDER) == expected, what=f"{body} recorded")


@pytest.fixture
def opt_out_queries(sql: Engine) -> Iterator[list[str]]:
    """Every SQL statement that reads or writes opt_outs, while the test runs."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "opt_outs" in statement:
            seen.append(statement)

    event.listen(sql, "before_cursor_execute", count)
    yield seen
    event.remove(sql, "before_cursor_execute", count)


class TestSurvivesRedis:
    """An opt-out is the database's: a Redis flush never lets a message through to a person who texted STOP."""

    def test_after_a_flush_replies_to_a_person_who_texted_stop_are_suppressed(
        self, client: FlaskClient, redis: redis_lib.Redis, engine_bot: Bot, sql: Engine, twilio: TwilioStandin,
        worker: dramatiq.Worker,
    ) -> None:
        """STOP is recorded with how it came; after FLUSHALL, a queued reply to that person never reaches Twilio."""
        # Given a person who texted STOP, recorded by the worker (its engine's answer suppressed)
        text_and_wait(client, sql, engine_bot, "STOP", (True, "keyword STOP"))
        wait_until(outbox_empty(redis, engine_bot, SENDER), what="the answer to STOP suppressed")
        # When Redis loses everything (the test database stands in for FLUSHALL), and replies are queued
        redis.flushdb()
        send(redis, engine_bot, SENDER, "after the flush")
        send(redis, engine_bot, BOB, "to bob")
        # Then only the other person's reply is sent
        twilio.wait_for(1)
        wait_until(outbox_empty(redis, engine_bot, SENDER), what="the reply suppressed")
        assert ([], ["to bob"]) == ([a for a in twilio.attempts if a.to == SENDER], bodies_to(twilio.messages, BOB))

    def test_start_after_a_flush_lets_replies_through_again(
        self, client: FlaskClient, redis: redis_lib.Redis, engine_bot: Bot, sql: Engine, twilio: TwilioStandin,
        worker: dramatiq.Worker,
    ) -> None:
        """Someone opted out before the flush who texts START after it gets the engine's answer, and later replies."""
        # Given a person opted out before Redis was flushed
        text_and_wait(client, sql, engine_bot, "STOP", (True, "keyword STOP"))
        wait_until(outbox_empty(redis, engine_bot, SENDER), what="the answer to STOP suppressed")
        redis.flushdb()
        # When they text START
        text_and_wait(client, sql, engine_bot, "START", (False, "keyword START"))
        # Then the engine's answer reaches them, and so does a reply queued later
        twilio.wait_for(1)
        send(redis, engine_bot, SENDER, "welcome back")
        twilio.wait_for(2)
        assert ["reply to START", "welcome back"] == bodies_to(twilio.messages, SENDER)

    def test_rebuilding_the_copy_keeps_a_stop_that_reached_redis_first(
        self, client: FlaskClient, redis: redis_lib.Redis, bot: Bot, sql: Engine, twilio: TwilioStandin,
        broker: dramatiq.Broker,
    ) -> None:
        """A STOP the webhook recorded while Redis had no copy (the database still saying "opted in") suppresses the
        next send: the copy is rebuilt as a union with what Redis holds, never a replacement."""
        from worker.outbound import deliver_now

        twilio.reset()
        # Given the database says the person opted back in, and Redis (flushed) has no copy
        with transaction(sql) as connection:
            optout.record(connection, bot.number, SENDER, False, "keyword START", at=time.time() - 60)
        assert 0 == redis.exists(keys.opted_out(bot.number))
        # When they text STOP (no worker has recorded it yet) and a reply is sent to them from this thread
        assert 200 == post_signed(client, inbound_params(Body="STOP")).status_code
        conversation = keys.conversation_id(bot.id, SENDER)
        reply_id = queue_replies(redis, conversation, [new_reply(conversation, SENDER, "too late")])
        assert reply_id is not None
        deliver_now(conversation, reply_id)
        # Then nothing was sent, and the rebuilt copy has both the database's word and the STOP
        assert [] == twilio.attempts
        assert (True, True) == (redis.hexists(keys.opted_out(bot.number), optout.LOADED),
                                optout.is_opted_out(redis, bot.number, SENDER))


class TestRecording:
    """Every way a person opts out is recorded in the database, saying how."""

    def test_21610_from_twilio_records_the_opt_out(
        self, redis: redis_lib.Redis, store: BotStore, sql: Engine, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """A send refused with 21610 records the person opted out, how "error 21610"."""
        bot = make_bot(store, "+15550000701")
        twilio.fail_next(1, status=400, code=21610, to=ALICE)
        send(redis, bot, ALICE, "refused")
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        assert ((True, "error 21610"), True) == (state(sql, bot, ALICE), optout.is_opted_out(redis, bot.number, ALICE))

    def test_21610_in_a_status_callback_records_the_opt_out(
        self, client: FlaskClient, redis: redis_lib.Redis, bot: Bot, sql: Engine,
    ) -> None:
        """A status callback saying 21610 records the recipient opted out, how "error 21610"."""
        recipient = callback("SM" + "0" * 32, "failed")["To"]
        post_status(client, callback("SM" + "0" * 32, "failed", ErrorCode="21610"))
        assert ((True, "error 21610"), True) == (state(sql, bot, recipient),
                                                 optout.is_opted_out(redis, bot.number, recipient))

    def test_twilios_opt_out_type_is_recorded_as_such(
        self, client: FlaskClient, engine_bot: Bot, sql: Engine, worker: dramatiq.Worker,
    ) -> None:
        """An opt-out that Twilio's Advanced Opt-Out named is recorded as "OptOutType STOP"."""
        assert 200 == post_signed(client, inbound_params(Body="please stop", OptOutType="STOP")).status_code
        wait_until(lambda: state(sql, engine_bot, SENDER) == (True, "OptOutType STOP"), what="the opt-out recorded")

    def test_an_older_event_does_not_overwrite_a_newer_one(self, bot: Bot, sql: Engine) -> None:
        """A STOP handled again after the START that followed it (a retry, a late callback) leaves the START."""
        with transaction(sql) as connection:
            optout.record(connection, bot.number, SENDER, False, "keyword START", at=200.0)
            optout.record(connection, bot.number, SENDER, True, "keyword STOP", at=100.0)
        assert (False, "keyword START") == state(sql, bot, SENDER)


class TestSendPath:
    """The check before every send reads the Redis copy: the database is not asked per send."""

    def test_no_database_query_per_send_while_the_copy_is_there(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        opt_out_queries: list[str],
    ) -> None:
        """Once the copy is built (one query), ten sends to two people ask the database nothing about opt-outs."""
        # Given a copy built by a first send
        bot = make_bot(store, "+15550000702")
        send(redis, bot, ALICE, "first")
        twilio.wait_for(1)
        assert 1 == len(opt_out_queries)
        # When ten more replies go out
        opt_out_queries.clear()
        for n in range(5):
            send(redis, bot, ALICE, f"a{n}")
            send(redis, bot, BOB, f"b{n}")
        twilio.wait_for(11)
        # Then no statement touched opt_outs
        assert [] == opt_out_queries


    def test_a_rebuilt_entry_the_database_contradicts_is_dropped(
        self, redis: redis_lib.Redis, bot: Bot, sql: Engine,
    ) -> None:
        """A person the copy took from the database before their START was recorded there is let through once it is."""
        # Given a copy rebuilt while the person was still opted out in the database
        with transaction(sql) as connection:
            optout.record(connection, bot.number, SENDER, True, "keyword STOP", at=100.0)
        optout.load_copy(sql, redis, bot.number)
        # When their START is recorded after the rebuild read the database
        with transaction(sql) as connection:
            optout.record(connection, bot.number, SENDER, False, "keyword START", at=200.0)
        looked = redis.hmget(keys.opted_out(bot.number), [SENDER, optout.LOADED])
        # Then the send goes ahead, and the copy forgets them
        assert (False, False) == (optout.opted_out_after_look(sql, redis, bot.number, SENDER, looked),
                                  optout.is_opted_out(redis, bot.number, SENDER))

    def test_a_rebuilt_entry_the_database_confirms_is_suppressed(
        self, redis: redis_lib.Redis, bot: Bot, sql: Engine,
    ) -> None:
        """A person still opted out in the database stays suppressed, and stays in the copy."""
        with transaction(sql) as connection:
            optout.record(connection, bot.number, SENDER, True, "keyword STOP", at=100.0)
        optout.load_copy(sql, redis, bot.number)
        looked = redis.hmget(keys.opted_out(bot.number), [SENDER, optout.LOADED])
        assert (True, True) == (optout.opted_out_after_look(sql, redis, bot.number, SENDER, looked),
                                optout.is_opted_out(redis, bot.number, SENDER))
