"""Sending: replies on a conversation's outbox reach Twilio in order, with what the engine said."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from urllib.parse import quote

import dramatiq
import pytest
import redis as redis_lib
from sqlalchemy import Engine, select
from flask.testing import FlaskClient

from cli.twilio_standin import SentMessage, TwilioStandin
from shared import keys, messagelog, metrics, optout
from shared.bots import Bot, BotStore
from shared.conversations import new_reply, queue_replies, replies_from
from shared.db import get_engine, transaction
from shared.schema import deliveries
from shared.settings import get_settings
from shared.tasks import OUTBOUND_QUEUE, kick_delivery
from tests.conftest import BOT_ACCOUNT_SID, BOT_AUTH_TOKEN
from tests.support.messagelog import log_written
from tests.support.processes import start_worker

ALICE = "+15552220001"
BOB = "+15552220002"
FAST = 50.0  # messages per second: pacing out of the way of tests about order and content


def make_bot(store: BotStore, number: str, rate: float = FAST, **extra: object) -> Bot:
    return store.create({
        "name": f"bot {number}", "twilio-account-sid": BOT_ACCOUNT_SID, "twilio-auth-token": BOT_AUTH_TOKEN,
        "main-phone-number": number, "messages-per-second": rate, **extra,
    })


def sql() -> Engine:
    """The database the in-process worker writes (worker_env's DATABASE_URL)."""
    return get_engine(get_settings())


def send(redis: redis_lib.Redis, bot: Bot, to: str, *texts: str, media_url: str | None = None) -> list[str]:
    """Log and queue replies exactly as the conversation side does, and kick the outbox if it was idle."""
    conversation = keys.conversation_id(bot.id, to)
    replies = [new_reply(conversation, to, text, media_url=media_url, received_at=time.time()) for text in texts]
    with transaction(sql()) as connection:
        messagelog.record_replies(connection, replies, bot.number, origin=messagelog.ENGINE)
    kick = queue_replies(redis, conversation, replies)
    if kick is not None:
        kick_delivery(conversation, kick)
    return [reply["id"] for reply in replies]


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


def outbox_empty(redis: redis_lib.Redis, bot: Bot, to: str) -> Callable[[], bool]:
    return lambda: redis.llen(keys.outbox(keys.conversation_id(bot.id, to))) == 0


def bodies_to(messages: list[SentMessage], to: str) -> list[str]:
    return [message.body for message in messages if message.to == to]


def log_entry(redis: redis_lib.Redis, bot: Bot, to: str, reply_id: str) -> dict[str, object]:
    """A reply as the log shows it, once every record handed to the log is written."""
    log_written(redis, sql())
    with sql().connect() as connection:
        entries = messagelog.read(connection, bot.id, to, limit=messagelog.MAX_LIMIT).items
    return next(entry for entry in entries if entry["id"] == reply_id)


class TestOrder:
    """Replies go out in the order they were queued, whatever the number of threads and processes."""

    def test_many_replies_of_one_conversation_arrive_in_order_under_four_threads(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """Twenty replies queued in three batches arrive exactly in queue order."""
        # Given a fast bot and a worker with four threads
        bot = make_bot(store, "+15550000101")
        expected = [f"reply {n}" for n in range(20)]
        # When the replies are queued in batches, as several engine answers would be
        for batch in (expected[:7], expected[7:8], expected[8:]):
            send(redis, bot, ALICE, *batch)
        # Then Twilio receives them in that order, each once
        messages = twilio.wait_for(20)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        assert expected == bodies_to(twilio.messages, ALICE)
        assert {bot.number} == {message.from_ for message in messages}

    def test_conversations_of_one_bot_and_of_two_bots_proceed_in_parallel_each_in_order(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """Three conversations on two bots all complete, each in its own order, from its own number."""
        first, second = make_bot(store, "+15550000102"), make_bot(store, "+15550000103")
        plan = [(first, ALICE, "a"), (first, BOB, "b"), (second, ALICE, "c")]
        for bot, to, tag in plan:
            send(redis, bot, to, *[f"{tag}{n}" for n in range(8)])
        twilio.wait_for(24)
        for bot, to, tag in plan:
            sent = [m.body for m in twilio.messages if m.to == to and m.from_ == bot.number]
            assert [f"{tag}{n}" for n in range(8)] == sent

    def test_order_holds_with_two_worker_processes_draining_one_conversation(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        worker_env: dict[str, str],
    ) -> None:
        """With the Procfile's worker (two processes) and this one consuming, replies still arrive in order."""
        # Given two more worker processes on the same Redis
        with start_worker(worker_env, processes=2, threads=4):
            bot = make_bot(store, "+15550000104")
            expected = [f"m{n}" for n in range(30)]
            # When replies are queued one engine answer at a time
            for text in expected:
                send(redis, bot, ALICE, text)
            # Then they arrive in order
            twilio.wait_for(30, timeout=30)
            wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        assert expected == bodies_to(twilio.messages, ALICE)


class TestContent:
    """Each reply becomes one Twilio message with the engine's text and image, logged with its SID."""

    def test_accepted_reply_is_logged_with_twilio_sid_and_queued_status(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """The log entry of a sent reply carries Twilio's MessageSid and the status Twilio answered."""
        bot = make_bot(store, "+15550000201")
        [reply_id] = send(redis, bot, ALICE, "hello")
        [message] = twilio.wait_for(1)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        entry = log_entry(redis, bot, ALICE, reply_id)
        assert (message.sid, "queued", "out", "hello") == (entry["sid"], entry["status"], entry["direction"], entry["text"])
        assert {"pending", "queued"} <= set(entry["statuses"])  # type: ignore[arg-type]

    def test_engine_image_becomes_media_url(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """An engine `image` is sent as Twilio's MediaUrl alongside the text."""
        bot = make_bot(store, "+15550000202")
        send(redis, bot, ALICE, "look", media_url="https://example.com/cat.png")
        [message] = twilio.wait_for(1)
        assert ("look", ["https://example.com/cat.png"]) == (message.body, message.media_urls)

    def test_status_callback_points_at_public_url_when_set(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """With PUBLIC_URL set, each send asks Twilio to report its status to /channels/sms/status, naming
        the reply (so a callback can settle a send whose answer was lost)."""
        monkeypatch.setenv("PUBLIC_URL", "https://sms.example.com")
        get_settings.cache_clear()
        try:
            bot = make_bot(store, "+15550000203")
            [reply_id] = send(redis, bot, ALICE, "hi")
            [message] = twilio.wait_for(1)
        finally:
            monkeypatch.delenv("PUBLIC_URL")
            get_settings.cache_clear()
        assert f"https://sms.example.com/channels/sms/status?reply={reply_id}" == message.status_callback

    def test_text_over_1600_characters_arrives_as_several_messages_in_order(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """A 4000-character answer is split at word boundaries into messages Twilio accepts, in order."""
        bot = make_bot(store, "+15550000204")
        conversation = keys.conversation_id(bot.id, ALICE)
        text = " ".join(f"palabra{n:04d}" for n in range(360))  # 4319 characters
        replies = replies_from(conversation, ALICE, text)
        kick = queue_replies(redis, conversation, replies)
        assert kick is not None
        kick_delivery(conversation, kick)
        messages = twilio.wait_for(len(replies))
        bodies = bodies_to(messages, ALICE)
        assert 3 == len(bodies)
        assert all(len(body) <= 1600 for body in bodies)
        assert text == " ".join(bodies)
        assert all(attempt.code is None for attempt in twilio.attempts)  # no 21617 along the way


class TestOptOut:
    """Nothing is ever sent to a recipient who opted out."""

    def test_replies_to_an_opted_out_recipient_are_suppressed_and_logged(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """Replies to a person who texted STOP are never posted; their log entries say "suppressed"."""
        bot = make_bot(store, "+15550000301")
        optout.opt_out(get_engine(get_settings()), redis, bot.number, ALICE, how="keyword STOP")
        suppressed = send(redis, bot, ALICE, "one", "two")
        send(redis, bot, BOB, "to bob")
        twilio.wait_for(1)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        assert [] == [attempt for attempt in twilio.attempts if attempt.to == ALICE]
        assert ["suppressed", "suppressed"] == [log_entry(redis, bot, ALICE, i)["status"] for i in suppressed]
        metrics.TALLY.flush(redis)  # what the worker's flusher writes every second
        assert "2" == redis.hget(keys.METRIC_COUNTERS, 'sms_outbound{result="suppressed"}')

    def test_stale_or_duplicate_kicks_send_nothing_twice(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """Kicking a reply that was already sent (as a redelivery would) neither sends it again nor
        holds up the next reply, even while the stale kicks hold the outbox lease."""
        bot = make_bot(store, "+15550000302")
        [reply_id] = send(redis, bot, ALICE, "once")
        twilio.wait_for(1)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        conversation = keys.conversation_id(bot.id, ALICE)
        for _ in range(10):
            kick_delivery(conversation, reply_id)
        send(redis, bot, ALICE, "after")
        twilio.wait_for(2)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        assert ["once", "after"] == bodies_to(twilio.messages, ALICE)


class TestOutboxHead:
    """Only the head of a conversation's outbox is ever worked on, whatever kicks arrive."""

    def test_a_kick_for_a_reply_behind_the_head_sends_nothing_before_the_head(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker,
    ) -> None:
        """A kick for the second reply while the first waits sends nothing; the first's kick sends both, in order, once."""
        # Given two replies on an outbox, with no kick yet (their worker is about to send one)
        bot = make_bot(store, "+15550000304")
        conversation = keys.conversation_id(bot.id, ALICE)
        first, second = (new_reply(conversation, ALICE, text) for text in ("first", "second"))
        queue_replies(redis, conversation, [first, second])

        # When a kick for the second arrives first (a redelivery, a sweeper racing the worker)
        kick_delivery(conversation, second["id"])
        broker.join(OUTBOUND_QUEUE, timeout=10_000)

        # Then nothing went out: the second is not the head
        assert [] == bodies_to(twilio.messages, ALICE)
        # And once the head is kicked, both go out in order, each once
        kick_delivery(conversation, first["id"])
        twilio.wait_for(2)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        broker.join(OUTBOUND_QUEUE, timeout=10_000)
        assert ["first", "second"] == bodies_to(twilio.messages, ALICE)

    def test_a_stale_kick_for_a_sent_reply_leaves_its_logged_status_alone(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker, client: FlaskClient, admin_headers: dict[str, str],
    ) -> None:
        """Redelivered kicks for a reply Twilio already took leave its log entry "queued", never "failed"."""
        # Given a reply Twilio accepted
        bot = make_bot(store, "+15550000305")
        [reply_id] = send(redis, bot, ALICE, "once")
        [message] = twilio.wait_for(1)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")

        # When stale kicks for it arrive, and are worked off
        conversation = keys.conversation_id(bot.id, ALICE)
        for _ in range(3):
            kick_delivery(conversation, reply_id)
        broker.join(OUTBOUND_QUEUE, timeout=10_000)

        # Then the log still shows it as Twilio answered, with no failure in its history
        log_written(redis, sql())
        response = client.get(f"/app:mammut-1/graph/user:{bot.id}/messages?with={quote(ALICE)}", headers=admin_headers)
        [entry] = [e for e in response.get_json()["data"]["messages"] if e["id"] == reply_id]
        assert (message.sid, "queued") == (entry["sid"], entry["status"])
        assert "failed" not in entry["statuses"]


    @pytest.mark.parametrize("queued", [1, 3])
    def test_finishing_a_reply_that_is_no_longer_the_head_leaves_the_outbox_as_it_is(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        queued: int,
    ) -> None:
        """A worker that finishes a reply another worker already finished (its lease lapsed meanwhile)
        takes nothing off the outbox, whether one reply or several wait there: they all still go out,
        in order, once each."""
        from worker.outbound import Head, _finish

        # Given replies waiting on an outbox, and one finished earlier
        bot = make_bot(store, f"+1555000031{queued}")
        conversation = keys.conversation_id(bot.id, ALICE)
        waiting = [new_reply(conversation, ALICE, f"reply {n}") for n in range(queued)]
        queue_replies(redis, conversation, waiting)
        gone = new_reply(conversation, ALICE, "finished already")

        # When its worker finishes it again
        _finish(redis, conversation, Head(gone["id"], gone, bot), "queued", sid="SM" + "0" * 32)

        # Then the outbox is as it was, and its replies go out in order once each
        assert [reply["id"] for reply in waiting] == redis.lrange(keys.outbox(conversation), 0, -1)
        kick_delivery(conversation, waiting[0]["id"])
        twilio.wait_for(queued)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        assert [f"reply {n}" for n in range(queued)] == bodies_to(twilio.messages, ALICE)


class TestDeliverNow:
    """`deliver_now` sends from the calling thread and hands what it cannot finish to the worker."""

    @pytest.fixture
    def deliver_now(self, broker: dramatiq.Broker) -> Callable[[str, str], None]:
        from worker.outbound import deliver_now

        return deliver_now

    def queued(self, redis: redis_lib.Redis, bot: Bot, to: str, text: str) -> tuple[str, str]:
        conversation = keys.conversation_id(bot.id, to)
        reply_id = queue_replies(redis, conversation, [new_reply(conversation, to, text)])
        assert reply_id is not None
        return conversation, reply_id

    def test_reply_is_sent_with_no_worker_running(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, deliver_now: Callable[[str, str], None],
    ) -> None:
        """The send happens in the caller's thread: no Dramatiq message, no worker needed."""
        twilio.reset()
        bot = make_bot(store, "+15550000801")
        deliver_now(*self.queued(redis, bot, ALICE, "inline"))
        assert ["inline"] == bodies_to(twilio.messages, ALICE)
        assert outbox_empty(redis, bot, ALICE)()

    def test_refusals_are_handed_to_the_worker_retried_or_dead_lettered(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker, deliver_now: Callable[[str, str], None],
    ) -> None:
        """A 429 is sent later by the worker; a 21211 is dead-lettered once, with no second attempt."""
        from shared.dlq import list_dead_letters

        bot = make_bot(store, "+15550000802")
        twilio.fail_next(1, status=429, code=20429, to=ALICE)
        twilio.fail_next(1, status=400, code=21211, to=BOB)
        deliver_now(*self.queued(redis, bot, ALICE, "later"))
        _, refused = self.queued(redis, bot, BOB, "never")
        deliver_now(keys.conversation_id(bot.id, BOB), refused)
        [message] = twilio.wait_for(1)
        wait_until(lambda: list_dead_letters(redis, broker), what="a dead letter")
        assert ("later", ALICE) == (message.body, message.to)
        assert [(refused, 21211)] == [(d["reply_id"], d["error_code"]) for d in list_dead_letters(redis, broker)]
        assert [21211] == [attempt.code for attempt in twilio.attempts if attempt.to == BOB]

    def test_a_reply_that_must_wait_for_its_slot_is_scheduled_not_slept_on(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, broker: dramatiq.Broker,
        deliver_now: Callable[[str, str], None],
    ) -> None:
        """deliver_now leaves a paced reply to a delayed send_reply, which a worker sends no earlier than its slot."""
        from worker import pacing

        # Given a 1 message/s number that has just sent
        twilio.reset()
        bot = make_bot(store, "+15550000803", rate=1.0)
        assert 0.0 == pacing.reserve(redis, bot.number, 1, 1.0)[1]
        conversation, reply_id = self.queued(redis, bot, ALICE, "paced")

        # When the next reply is delivered "now"
        deliver_now(conversation, reply_id)

        # Then nothing went out; a send_reply for it waits on the delay queue
        assert [] == twilio.messages
        delayed = [json.loads(body) for body in redis.hvals(f"dramatiq:{OUTBOUND_QUEUE}.DQ.msgs")]
        assert [[conversation, reply_id]] == [body["args"] for body in delayed]
        # And a worker sends it at its slot, not before
        slot_at = json.loads(redis.hget(keys.replies(conversation), reply_id))["slot_at"]
        running = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
        running.start()
        try:
            [message] = twilio.wait_for(1)
        finally:
            running.stop()
        assert ("paced", ALICE) == (message.body, message.to)
        assert message.received_at >= slot_at
