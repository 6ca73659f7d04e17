"""The dead-letter queue shows what failed for good and resends it on request."""

from __future__ import annotations

import time

import dramatiq
import pytest
import redis as redis_lib

from cli.twilio_standin import TwilioStandin
from shared import keys
from shared.bots import BotStore
from tests.test_outbound import ALICE, BOB, bodies_to, make_bot, outbox_empty, send, wait_until
from worker.dlq import list_dead_letters, replay


def dead_letters(redis: redis_lib.Redis, broker: dramatiq.Broker, count: int) -> list[dict[str, object]]:
    wait_until(lambda: len(list_dead_letters(redis, broker)) >= count, timeout=15, what=f"{count} dead letter(s)")
    return list_dead_letters(redis, broker)


class TestList:
    """`list_dead_letters` joins Dramatiq's dead letters with the replies they were sending."""

    def test_permanent_failure_is_listed_with_recipient_text_code_and_time(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker,
    ) -> None:
        """A reply refused with 21211 appears once, with whom it was for, what it said, the code and when."""
        # Given Twilio refuses every send to Alice as an invalid number
        bot = make_bot(store, "+15550000601")
        twilio.fail_always(to=ALICE, status=400, code=21211)
        before = time.time()
        # When a reply to her fails
        [reply_id] = send(redis, bot, ALICE, "hola")
        [dead] = dead_letters(redis, broker, 1)
        # Then it is listed under Dramatiq's message id, with the reply's details
        [message_id] = redis.zrange(f"{broker.namespace}:outbound.XQ", 0, -1)
        expected = {"id": message_id, "reply_id": reply_id, "conversation": keys.conversation_id(bot.id, ALICE),
                    "bot_id": bot.id, "to": ALICE, "text": "hola", "error_code": 21211, "reason": "permanent"}
        assert expected == {key: dead[key] for key in expected}
        assert before <= dead["failed_at"] <= time.time()  # type: ignore[operator]

    def test_empty_queue_lists_nothing(self, redis: redis_lib.Redis, broker: dramatiq.Broker) -> None:
        """With nothing dead-lettered the list is empty."""
        assert [] == list_dead_letters(redis, broker)


class TestReplay:
    """`replay` queues each dead reply again at the tail of its conversation and clears it from the queue."""

    def test_replay_resends_every_dead_reply_and_empties_the_queue(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker,
    ) -> None:
        """After the cause is fixed, replaying sends each failed text once and leaves no dead letter behind."""
        # Given two replies that failed for good
        bot = make_bot(store, "+15550000602")
        twilio.fail_always(to=ALICE, status=400, code=21614)
        twilio.fail_always(to=BOB, status=401, code=20003)
        [to_alice] = send(redis, bot, ALICE, "para alice")
        [to_bob] = send(redis, bot, BOB, "for bob")
        dead = dead_letters(redis, broker, 2)
        # When the cause is gone and every dead letter is replayed
        twilio.reset()
        replayed = replay(redis, broker)
        # Then both texts go out and the queue and the kept copies are gone
        twilio.wait_for(2)
        assert sorted(entry["id"] for entry in dead) == sorted(replayed)  # type: ignore[type-var]
        assert (["para alice"], ["for bob"]) == (bodies_to(twilio.messages, ALICE), bodies_to(twilio.messages, BOB))
        assert [] == list_dead_letters(redis, broker)
        assert 0 == redis.exists(keys.dead_reply(to_alice), keys.dead_reply(to_bob))

    def test_replay_of_chosen_ids_leaves_the_others_dead(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker,
    ) -> None:
        """Only the dead letters named (by message or reply id) are resent; the rest stay listed."""
        bot = make_bot(store, "+15550000603")
        twilio.fail_always(to=ALICE, status=400, code=21211)
        twilio.fail_always(to=BOB, status=400, code=21211)
        [to_alice] = send(redis, bot, ALICE, "a")
        send(redis, bot, BOB, "b")
        dead_letters(redis, broker, 2)
        twilio.reset()
        replay(redis, broker, ids=[to_alice])
        twilio.wait_for(1)
        assert ["a"] == [message.body for message in twilio.messages]
        assert [BOB] == [entry["to"] for entry in list_dead_letters(redis, broker)]

    def test_replayed_reply_goes_after_replies_queued_since(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker,
    ) -> None:
        """A replay joins the tail of its conversation: it never jumps ahead of what is already queued."""
        bot = make_bot(store, "+15550000604", rate=2.0)
        twilio.fail_next(1, status=400, code=21211)
        send(redis, bot, ALICE, "failed first")
        dead_letters(redis, broker, 1)
        send(redis, bot, ALICE, "queued since 1", "queued since 2")
        replay(redis, broker)
        twilio.wait_for(3)
        assert ["queued since 1", "queued since 2", "failed first"] == bodies_to(twilio.messages, ALICE)

    def test_reply_dead_of_an_unexpected_error_is_kicked_where_it_stands(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A message that died of an unexpected error (its reply still heads the outbox) is resent by replay."""
        import worker.outbound as outbound

        # Given the send crashes once and Dramatiq does not retry it
        monkeypatch.setattr(outbound, "MAX_UNEXPECTED_RETRIES", 0)
        real_send = outbound.send_sms
        calls = []

        def crash_once(*args: object, **kwargs: object) -> object:
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real_send(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(outbound, "send_sms", crash_once)
        bot = make_bot(store, "+15550000605")
        send(redis, bot, ALICE, "survivor")
        [dead] = dead_letters(redis, broker, 1)
        assert ("unexpected", "survivor", True) == (dead["reason"], dead["text"], dead["still_queued"])
        # When it is replayed
        replay(redis, broker)
        # Then the same reply goes out, once
        [message] = twilio.wait_for(1)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        assert "survivor" == message.body
