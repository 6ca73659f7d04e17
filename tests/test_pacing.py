"""Pacing: a sender number sends at most its rate of segments per second, and only its own messages wait."""

from __future__ import annotations

import threading
import time

import dramatiq
import pytest
import redis as redis_lib

from cli.twilio_standin import SentMessage, TwilioStandin
from shared import keys, messagelog
from shared.bots import Bot, BotStore
from shared.conversations import new_reply, queue_replies
from shared.db import transaction
from shared.segments import count_segments
from shared.tasks import kick_delivery
from tests.test_outbound import ALICE, BOB, make_bot, send, sql
from worker import pacing

NUMBER, OTHER = "+15550000701", "+15550000702"
THIRD = "+15552220003"


def gaps(messages: list[SentMessage]) -> list[float]:
    times = [message.received_at for message in messages]
    return [later - earlier for earlier, later in zip(times, times[1:])]


class TestSchedule:
    """The Redis schedule of one number: reserved slots and the check made just before each send."""

    def test_reservations_are_spaced_by_their_segments_over_the_rate(self, redis: redis_lib.Redis) -> None:
        """At 2 segments/s a 1-, then a 2-, then a 1-segment message get slots 0.5 s and then 1 s apart."""
        first, first_wait = pacing.reserve(redis, NUMBER, 1, 2.0)
        second, second_wait = pacing.reserve(redis, NUMBER, 2, 2.0)
        third, _ = pacing.reserve(redis, NUMBER, 1, 2.0)
        assert 0.0 == first_wait  # an idle number sends at once
        assert second_wait == pytest.approx(second - first, abs=0.01)
        assert second - first == pytest.approx(pacing.interval(1, 2.0), abs=0.001)
        assert third - second == pytest.approx(pacing.interval(2, 2.0), abs=0.001)
        assert pacing.interval(2, 2.0) >= 1.0

    def test_a_numbers_state_outlives_its_schedule_and_a_busy_number_renews_it_rarely(
            self, redis: redis_lib.Redis) -> None:
        """The pace hash expires about IDLE_TTL after its last slot; sends within half of that leave its
        expiry alone (one EXPIREAT a half hour, not one a send), and a schedule reaching past it renews it."""
        from shared import keys

        key = keys.pace(NUMBER)
        pacing.reserve(redis, NUMBER, 1, 1.0)
        first_expiry = redis.ttl(key)
        assert pacing.IDLE_TTL_SECONDS - 5 <= first_expiry <= pacing.IDLE_TTL_SECONDS + 5
        expires = redis.hget(key, "expires")
        for _ in range(5):
            pacing.claim(redis, NUMBER, 1, 1000.0, 0.0)
            pacing.confirm(redis, NUMBER, 1, 1000.0)
        assert expires == redis.hget(key, "expires")
        # A schedule that reaches more than half the ttl ahead pushes the expiry on
        for _ in range(int(pacing.IDLE_TTL_SECONDS * 0.6)):
            slot, _ = pacing.reserve(redis, NUMBER, 1, 1.0)
        assert redis.ttl(key) >= slot - time.time() + pacing.IDLE_TTL_SECONDS / 2

    def test_numbers_have_separate_schedules(self, redis: redis_lib.Redis) -> None:
        """A number with ten reservations queued does not delay another number's first send."""
        for _ in range(10):
            pacing.reserve(redis, NUMBER, 1, 1.0)
        assert 0.0 == pacing.reserve(redis, OTHER, 1, 1.0)[1]

    def test_claim_waits_for_the_slot_then_records_the_send(self, redis: redis_lib.Redis) -> None:
        """A claim before the slot is told how long to wait; at the slot it goes; the next claim must wait."""
        pacing.reserve(redis, OTHER, 1, 1.0)
        future_slot, _ = pacing.reserve(redis, OTHER, 1, 1.0)
        assert 0.9 < pacing.claim(redis, OTHER, 1, 1.0, future_slot) <= pacing.interval(1, 1.0)
        # On a number with nothing sent yet, a slot that is due goes at once...
        assert 0.0 == pacing.claim(redis, NUMBER, 1, 1.0, 0.0)
        # ...and a message late for its slot still keeps its distance from the one just sent.
        assert 0.9 < pacing.claim(redis, NUMBER, 1, 1.0, 0.0) <= pacing.interval(1, 1.0)

    def test_late_send_pushes_later_reservations(self, redis: redis_lib.Redis) -> None:
        """A send made without a fresh reservation (a retry, a late slot) moves the next free slot past it."""
        assert 0.0 == pacing.claim(redis, NUMBER, 3, 1.0, 0.0)
        _, wait = pacing.reserve(redis, NUMBER, 1, 1.0)
        assert wait == pytest.approx(pacing.interval(3, 1.0), abs=0.01)

    def test_send_stalled_after_its_claim_keeps_the_next_a_full_interval_from_twilios_answer(
        self, redis: redis_lib.Redis,
    ) -> None:
        """If Twilio answers late (the send stalled on its way out), the next claim waits from the answer."""
        # Given a send claimed now whose answer came 0.3 s later
        assert 0.0 == pacing.claim(redis, NUMBER, 1, 1.0, 0.0)
        time.sleep(0.3)
        pacing.confirm(redis, NUMBER, 1, 1.0)
        # Then the next send may only go 1 s after the answer, not 1.05 s after the claim
        assert pacing.claim(redis, NUMBER, 1, 1.0, 0.0) > 0.95

    def test_worker_polls_often_enough_for_scheduled_sends_to_arrive_on_time(self, broker: dramatiq.Broker) -> None:
        """A worker started with Dramatiq's default 1 s poll is made to poll every POLL_MS instead."""
        running = dramatiq.Worker(broker, worker_timeout=1000, worker_threads=1)
        running.start()
        try:
            assert pacing.POLL_MS == running.worker_timeout
            assert {pacing.POLL_MS} == {consumer.worker_timeout for consumer in running.consumers.values()}
        finally:
            running.stop()


def answer(redis: redis_lib.Redis, bot: Bot, to: str, *texts: str) -> None:
    """Queue one engine answer as a conversation's thread does (queue_and_take: its first reply's turn
    taken in the same step when the outbox is idle) and go on as it does: send that reply from this
    thread, or leave the rest to the outbox's chain."""
    from worker.outbound import deliver_taken, queue_and_take  # needs the worker's settings

    conversation = keys.conversation_id(bot.id, to)
    replies = [new_reply(conversation, to, text, received_at=time.time()) for text in texts]
    with transaction(sql()) as connection:
        messagelog.record_replies(connection, replies, bot.number, origin=messagelog.ENGINE)
    queued = queue_and_take(redis, conversation, replies, bot, done_inbound="", log_record="", lease_token="")
    if queued.lease is not None:
        deliver_taken(conversation, replies[0], bot, queued)
    elif queued.head is not None:
        kick_delivery(conversation, queued.head)


class TestPacedSending:
    """Measured on the Twilio stand-in's arrival times, with the in-process worker's four threads."""

    def test_an_answer_queued_behind_another_still_waiting_for_its_turn_is_sent_whole(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """Two answers of two replies each, the second queued while the first's second reply waits for
        the number's pace: all four arrive, in order."""
        bot = make_bot(store, NUMBER, rate=2.0)
        answer(redis, bot, ALICE, "a1", "a2")
        answer(redis, bot, ALICE, "b1", "b2")
        assert ["a1", "a2", "b1", "b2"] == [message.body for message in twilio.wait_for(4)]

    def test_an_answer_whose_number_is_busy_with_another_conversation_is_sent_at_its_turn(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """An idle conversation's answer, on a number another conversation just sent from: its turn is
        taken with its queueing, it waits for it, and it arrives."""
        bot = make_bot(store, NUMBER, rate=2.0)
        answer(redis, bot, BOB, "for bob")
        answer(redis, bot, ALICE, "for alice")
        messages = twilio.wait_for(2)
        assert ["for bob", "for alice"] == [message.body for message in messages]
        assert gaps(messages)[0] >= 0.5

    def test_replies_twilio_answers_late_keep_the_next_send_a_full_interval_from_the_answer(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """Replies on one number that Twilio answers 0.6 s late: each next send goes a full interval
        after the answer, not 1.05 s after the claim. The first is sent from its conversation's
        thread, its turn claimed as it was queued; the second by the worker at its turn, claimed
        then. The step that finishes each confirms the pace from when Twilio answered."""
        bot = make_bot(store, NUMBER, rate=1.0)
        twilio.accept_then_delay(0.6, count=2)
        first = threading.Thread(target=answer, args=(redis, bot, ALICE, "late answer"))
        first.start()
        twilio.wait_for(1)  # ALICE's reply is at Twilio, its answer held back
        answer(redis, bot, BOB, "claimed at its turn, answered late")
        first.join()
        twilio.wait_for(2)
        answer(redis, bot, THIRD, "last")
        messages = twilio.wait_for(3)
        assert ["late answer", "claimed at its turn, answered late", "last"] == [message.body for message in messages]
        assert all(gap >= 0.6 + 1.0 - 0.05 for gap in gaps(messages)), gaps(messages)

    def test_an_answer_sent_at_once_leaves_the_pending_set_to_the_step_that_finishes_it(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, broker: dramatiq.Broker,
    ) -> None:
        """The step that queues an answer and claims its first send neither notes the conversation in
        the pending set nor counts its inbox (the finishing step does both); one that cannot claim it
        (the number busy) does both itself, for the sweeper and for the drain."""
        from worker.outbound import queue_and_take

        bot = make_bot(store, NUMBER, rate=2.0)
        for person, expected in ((ALICE, (None, 1.0)), (BOB, (True, None))):
            conversation = keys.conversation_id(bot.id, person)
            redis.zadd(keys.PENDING, {conversation: 1.0})  # as its text's acceptance left it, long ago
            redis.rpush(keys.inbox(conversation), "a later text")  # waiting behind the one answered
            queued = queue_and_take(redis, conversation, [new_reply(conversation, person, "hi")], bot,
                                    done_inbound="", log_record="", lease_token="")
            score = redis.zscore(keys.PENDING, conversation)
            assert expected == (queued.waiting, score if score == 1.0 else None), person
        assert redis.zscore(keys.PENDING, keys.conversation_id(bot.id, BOB)) > time.time() - 60

    def test_replies_queued_without_a_claim_note_their_conversation_for_the_sweeper(
        self, redis: redis_lib.Redis, store: BotStore, broker: dramatiq.Broker,
    ) -> None:
        """An operator's send, a scheduled message, a replay or a resend queues on a conversation that
        may be idle and in no pending set: the step notes it there, so a worker lost before the send
        leaves it where the sweeper looks."""
        bot = make_bot(store, NUMBER, rate=2.0)
        conversation = keys.conversation_id(bot.id, ALICE)
        assert queue_replies(redis, conversation, [new_reply(conversation, ALICE, "from the operator")]) is not None
        assert redis.zscore(keys.PENDING, conversation) > time.time() - 60

    def test_five_replies_at_two_per_second_arrive_at_least_half_a_second_apart(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """One conversation's five replies to a 2-message/s number never arrive closer than 0.5 s."""
        bot = make_bot(store, NUMBER, rate=2.0)
        send(redis, bot, ALICE, *[f"r{n}" for n in range(5)])
        messages = twilio.wait_for(5)
        assert 4 == len(gaps(messages))
        assert min(gaps(messages)) >= 0.5

    def test_conversations_on_one_number_share_its_pace(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """Five people answered at once by one 2-message/s number still get their replies 0.5 s apart."""
        bot = make_bot(store, NUMBER, rate=2.0)
        for n in range(5):
            send(redis, bot, f"+1555222{n:04d}", f"hello {n}")
        messages = twilio.wait_for(5)
        assert min(gaps(messages)) >= 0.5

    @pytest.mark.parametrize(("long_text", "segments"), [
        ("x" * 200, 2),  # GSM-7: 153 characters a segment once split
        ("¿Cómo estás? " * 6, 2),  # 78 characters with ó and á: UCS-2, 67 a segment once split
    ])
    def test_message_of_two_segments_holds_its_number_twice_as_long(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        long_text: str, segments: int,
    ) -> None:
        """At 2 segments/s, the reply after a 2-segment message arrives at least 1 s after it."""
        assert segments == count_segments(long_text)
        bot = make_bot(store, NUMBER, rate=2.0)
        send(redis, bot, ALICE, long_text, "short")
        messages = twilio.wait_for(2)
        assert [long_text, "short"] == [message.body for message in messages]
        assert gaps(messages)[0] >= segments / 2.0

    def test_busy_number_does_not_delay_another_number(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
    ) -> None:
        """A reply from a second number arrives before the busy first number's second reply."""
        # Given a 1-message/s number with a burst of six replies to six people
        busy, idle = make_bot(store, NUMBER, rate=1.0), make_bot(store, OTHER, rate=1.0)
        for n in range(6):
            send(redis, busy, f"+1555333{n:04d}", f"burst {n}")
        # When another number has one reply to send
        send(redis, idle, BOB, "not held up")
        # Then it does not queue behind the burst
        twilio.wait_for(3, timeout=15)
        from_busy = [m for m in twilio.messages if m.from_ == busy.number]
        [from_idle] = [m for m in twilio.messages if m.from_ == idle.number]
        assert from_idle.received_at < from_busy[1].received_at
