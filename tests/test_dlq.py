"""The dead-letter queue shows what failed for good and resends it on request."""

from __future__ import annotations

import json
import threading
import time

import dramatiq
import pytest
import redis as redis_lib

from cli.main import main
from cli.twilio_standin import TwilioStandin
from shared import keys
from shared.bots import BotStore
from shared.tasks import OUTBOUND_QUEUE
from tests.test_outbound import ALICE, BOB, bodies_to, make_bot, outbox_empty, send, wait_until
from shared.dlq import list_dead_letters, replay


def dead_letters(redis: redis_lib.Redis, broker: dramatiq.Broker, count: int) -> list[dict[str, object]]:
    wait_until(lambda: len(list_dead_letters(redis, broker)) >= count, timeout=15, what=f"{count} dead letter(s)")
    return list_dead_letters(redis, broker)


def dramatiq_dead_letters(redis: redis_lib.Redis, broker: dramatiq.Broker) -> int:
    """How many messages Dramatiq's own dead-letter queue holds (in Redis, for 7 days)."""
    return int(redis.zcard(f"{broker.namespace}:{OUTBOUND_QUEUE}.XQ"))


class TestList:
    """`list_dead_letters` shows the database's dead replies, and the messages Dramatiq dead-lettered."""

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
        # Then it is listed under its reply id, with the reply's details
        expected = {"id": reply_id, "reply_id": reply_id, "conversation": keys.conversation_id(bot.id, ALICE),
                    "bot_id": bot.id, "to": ALICE, "text": "hola", "error_code": 21211, "http_status": 400,
                    "reason": "permanent", "attempts": 1, "still_queued": False}
        assert expected == {key: dead[key] for key in expected}
        assert before <= dead["failed_at"] <= time.time()  # type: ignore[operator]

    def test_a_permanent_failure_leaves_nothing_in_dramatiqs_dead_letter_queue(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker,
    ) -> None:
        """The dead reply is kept in the database only: Redis holds work in flight, not a week of failures."""
        # Given a reply refused for good, and one that went out after it
        bot = make_bot(store, "+15550000606")
        twilio.fail_next(1, status=400, code=21211)
        send(redis, bot, ALICE, "refused", "sent")
        twilio.wait_for(1)
        dead_letters(redis, broker, 1)
        # When every message of the outbound queue has been worked off
        broker.join(OUTBOUND_QUEUE, timeout=10_000)
        # Then Dramatiq kept nothing, and nothing of the reply is left in Redis
        reply_id = list_dead_letters(redis, broker)[0]["reply_id"]
        assert (0, 0) == (dramatiq_dead_letters(redis, broker), redis.exists(keys.dead_reply(reply_id)))

    def test_dead_letters_survive_a_redis_flush_and_dlq_list_shows_them(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker, worker_env: dict[str, str], capsys: pytest.CaptureFixture[str],
    ) -> None:
        """After Redis loses everything, `mammut-sms dlq list` still shows the reply that failed, with its code."""
        # Given a reply that failed for good
        bot = make_bot(store, "+15550000607")
        twilio.fail_always(to=ALICE, status=400, code=21614)
        [reply_id] = send(redis, bot, ALICE, "kept")
        dead_letters(redis, broker, 1)
        broker.join(OUTBOUND_QUEUE, timeout=10_000)
        # When Redis is flushed (the test database stands in for FLUSHALL)
        redis.flushdb()
        # Then the operator's listing, with the service's environment, still has it
        capsys.readouterr()
        code = main(["dlq", "list", "--json"])
        listed = json.loads(capsys.readouterr().out)
        assert (0, [(reply_id, ALICE, "kept", 21614, "permanent")]) == (
            code, [(d["id"], d["to"], d["text"], d["error_code"], d["reason"]) for d in listed])

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
        # Then both texts go out and no dead letter is left
        twilio.wait_for(2)
        assert sorted([to_alice, to_bob]) == sorted(str(entry["id"]) for entry in dead) == sorted(replayed)
        assert (["para alice"], ["for bob"]) == (bodies_to(twilio.messages, ALICE), bodies_to(twilio.messages, BOB))
        assert [] == list_dead_letters(redis, broker)

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

    def test_replaying_one_id_twice_at_once_queues_it_once(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker,
    ) -> None:
        """Two operators replaying the same dead letter at the same moment send its text once."""
        # Given a dead letter whose cause is gone
        bot = make_bot(store, "+15550000608")
        twilio.fail_next(1, status=400, code=21211)
        [reply_id] = send(redis, bot, ALICE, "just once")
        dead_letters(redis, broker, 1)
        broker.join(OUTBOUND_QUEUE, timeout=10_000)
        twilio.reset()
        # When two replays of it run at once
        start, results = threading.Barrier(2), []

        def replay_it() -> None:
            start.wait()
            results.append(replay(redis, broker, ids=[reply_id]))

        threads = [threading.Thread(target=replay_it) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # Then one of them replayed it, and it went out once
        twilio.wait_for(1)
        broker.join(OUTBOUND_QUEUE, timeout=10_000)
        assert ([[], [reply_id]], ["just once"]) == (sorted(results), bodies_to(twilio.messages, ALICE))
        assert [] == replay(redis, broker, ids=[reply_id])

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
