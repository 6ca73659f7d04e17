"""Wake-ups: the conversations queue as a plain Redis list of hints (shared/wakeups.py).

A worker takes them in batches and needs no acknowledgement round trips; one that stops gracefully
puts back what it took and never started; one that is killed loses only hints, and every
conversation they were for is answered anyway; wake-ups queued by an earlier release are adopted.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import dramatiq
import pytest
import redis as redis_lib
from dramatiq.errors import QueueJoinTimeout

from cli.twilio_standin import TwilioStandin
from shared import keys
from shared.bots import Bot, BotStore
from shared.tasks import CONVERSATIONS_QUEUE, NAMESPACE, conversation_kick
from shared.wakeups import HintConsumer
from tests.conftest import queued_kicks
from tests.support.fake_engine import FakeEngine
from tests.support.processes import Process, start_worker
from tests.test_crash_recovery import RECOVERY_LIMIT, bodies_to, send
from tests.test_crash_recovery import engine_bot, workers  # noqa: F401  (fixtures)
from webhook.metrics import dead_letters, queue_depths

SENDERS = [f"+1555987{n:04d}" for n in range(3)]


@pytest.fixture
def consumer(broker: dramatiq.Broker, redis: redis_lib.Redis) -> Iterator[HintConsumer]:
    """The conversations queue's consumer, as a worker's consumer thread gets it (prefetch 3)."""
    taken = broker.consume(CONVERSATIONS_QUEUE, prefetch=3, timeout=10)
    assert isinstance(taken, HintConsumer)
    yield taken


def push(broker: dramatiq.Broker, *conversations: str) -> None:
    for conversation in conversations:
        broker.enqueue(conversation_kick(conversation))


def waiting(redis: redis_lib.Redis) -> list[str]:
    return [kick.args[0] for kick in queued_kicks(redis)]


def take(consumer: HintConsumer, count: int) -> list[dramatiq.broker.MessageProxy]:
    taken = []
    for _ in range(count * 10):
        message = next(consumer)
        if message is not None:
            taken.append(message)
        if len(taken) == count:
            break
    return taken


class TestTheConsumer:
    """A worker process's consumer of wake-ups, against the test Redis."""

    def test_it_takes_no_more_than_its_prefetch_less_what_is_being_worked_on(
            self, broker: dramatiq.Broker, redis: redis_lib.Redis, consumer: HintConsumer) -> None:
        """Three in hand at prefetch 3: the rest stay in Redis for other processes until one is done."""
        # Given five wake-ups
        push(broker, "1:a", "1:b", "1:c", "1:d", "1:e")
        # When a consumer with prefetch 3 hands out what it may
        taken = take(consumer, 3)
        # Then it took three, in order, and holds no more while they are worked on
        assert ["1:a", "1:b", "1:c"] == [message.args[0] for message in taken]
        assert [None, None] == [next(consumer), next(consumer)]
        assert ["1:d", "1:e"] == waiting(redis)
        # And one done makes room for one more
        consumer.ack(taken[0])
        assert ["1:d"] == [message.args[0] for message in take(consumer, 1)]
        assert ["1:e"] == waiting(redis)

    def test_a_stop_puts_back_what_was_taken_and_not_started_in_order(
            self, broker: dramatiq.Broker, redis: redis_lib.Redis, consumer: HintConsumer) -> None:
        """Dramatiq's worker, stopping, requeues the messages its threads never started, then closes
        the consumer: both kinds go back to the front of the list, in the order they were queued."""
        # Given a consumer that handed out two wake-ups (one started) and popped a third, a fourth waiting
        push(broker, "1:a", "1:b", "1:c")
        started, unstarted = take(consumer, 2)
        push(broker, "1:d")
        # When the worker stops
        consumer.requeue([unstarted])
        consumer.close()
        consumer.ack(started)
        # Then what was not started waits again, first, in its order
        assert ["1:b", "1:c", "1:d"] == waiting(redis)
        assert not consumer.in_hand

    def test_a_consumer_closed_after_a_lost_connection_puts_back_what_it_had_popped(
            self, broker: dramatiq.Broker, redis: redis_lib.Redis, consumer: HintConsumer) -> None:
        """Dramatiq's consumer thread closes its consumer and starts a new one after a connection
        error: wake-ups popped and not handed out go back for it (or another process)."""
        push(broker, "1:a", "1:b", "1:c")
        take(consumer, 1)
        consumer.close()
        assert ["1:b", "1:c"] == waiting(redis)

    def test_a_wake_up_whose_actor_failed_for_good_is_kept_as_a_dead_letter(
            self, broker: dramatiq.Broker, redis: redis_lib.Redis, consumer: HintConsumer) -> None:
        """Where Dramatiq keeps its dead letters, so the metrics count it."""
        push(broker, "1:a")
        [message] = take(consumer, 1)
        message.fail()
        consumer.nack(message)
        stored = redis.hget(f"{NAMESPACE}:{CONVERSATIONS_QUEUE}.XQ.msgs", message.message_id)
        assert "1:a" == json.loads(stored)["args"][0]
        assert 1.0 == dead_letters(redis)[CONVERSATIONS_QUEUE]
        assert not consumer.in_hand

    def test_something_that_is_not_a_wake_up_is_skipped(
            self, broker: dramatiq.Broker, redis: redis_lib.Redis, consumer: HintConsumer,
            logs: list[dict[str, object]]) -> None:
        redis.rpush(keys.WAKE_UPS, "not json")
        push(broker, "1:a")
        assert ["1:a"] == [message.args[0] for message in take(consumer, 1)]
        assert ["wake_up.undecodable"] == [entry["event"] for entry in logs if entry["event"].startswith("wake_up")]

    def test_the_queue_depth_metric_counts_waiting_wake_ups(
            self, broker: dramatiq.Broker, redis: redis_lib.Redis) -> None:
        push(broker, "1:a", "1:b")
        assert 2.0 == queue_depths(redis)[CONVERSATIONS_QUEUE]

    def test_flushing_the_queue_drops_its_wake_ups(self, broker: dramatiq.Broker, redis: redis_lib.Redis) -> None:
        push(broker, "1:a")
        broker.flush(CONVERSATIONS_QUEUE)
        assert [] == waiting(redis)

    def test_join_waits_for_the_wake_ups_a_worker_holds(
            self, broker: dramatiq.Broker, redis: redis_lib.Redis, consumer: HintConsumer) -> None:
        """For tests, as Dramatiq's join: an empty list is not enough while one is being worked on."""
        push(broker, "1:a")
        [message] = take(consumer, 1)
        assert [] == waiting(redis)
        with pytest.raises(QueueJoinTimeout):
            broker.join(CONVERSATIONS_QUEUE, interval=10, timeout=200)
        consumer.ack(message)
        broker.join(CONVERSATIONS_QUEUE, interval=10, timeout=200)


def test_wake_ups_an_earlier_release_queued_are_adopted_and_answered(
        broker: dramatiq.Broker, redis: redis_lib.Redis, bot: Bot, store: BotStore, engine: FakeEngine,
        twilio: TwilioStandin, database: str) -> None:
    """After an upgrade, a wake-up queued the Dramatiq way (waiting, or taken by a worker now gone)
    still wakes its conversation, as soon as a worker starts."""
    # Given a text whose wake-up an earlier release queued in Dramatiq's list and hash
    answering = store.update(bot.id, {"engine-url": engine.url})
    send(redis, answering, "from before the upgrade", sender=SENDERS[0])
    [kick] = queued_kicks(redis)
    redis.delete(keys.WAKE_UPS)
    name = f"{NAMESPACE}:{CONVERSATIONS_QUEUE}"
    redis.hset(name + ".msgs", kick.message_id, kick.encode())
    redis.rpush(name, kick.message_id)
    # When the new release's worker starts
    twilio.reset()
    running = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    running.start()
    try:
        # Then the text is answered, and the old keys are gone
        twilio.wait_for(1, timeout=10)  # well before the sweeper would wake it (STALE_SECONDS)
        assert ["reply to from before the upgrade"] == bodies_to(twilio, SENDERS[0])
        assert 0 == redis.exists(name, name + ".msgs")
    finally:
        running.stop()


def test_a_stopping_worker_puts_back_the_wake_ups_it_took_and_never_started(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, twilio: TwilioStandin,
        workers: list[Process], worker_env: dict[str, str]) -> None:
    """SIGTERM to a one-thread worker busy on one conversation, holding the wake-ups of two more:
    it finishes the first, and the other two wait in Redis for the next worker."""
    # Given a worker of one thread (prefetch 2) on a slow engine call, with two more texts waiting
    engine.delay = 2.0
    workers.append(worker := start_worker(worker_env, processes=1, threads=1))
    send(redis, engine_bot, "first", sender=SENDERS[0])
    engine.wait_for_calls(1)
    for sender in SENDERS[1:]:
        send(redis, engine_bot, "waiting", sender=sender)
    time.sleep(0.5)  # its consumer polls every 0.1 s: it takes one more, all its prefetch allows
    assert 1 == len(queued_kicks(redis))
    # When it is stopped
    assert worker.popen is not None
    os.killpg(worker.popen.pid, signal.SIGTERM)
    assert 0 == worker.popen.wait(30)
    # Then the first is answered, and both others are woken for again
    assert ["reply to first"] == bodies_to(twilio, SENDERS[0])
    assert sorted(keys.conversation_id(engine_bot.id, sender) for sender in SENDERS[1:]) == sorted(waiting(redis))


def test_a_worker_killed_holding_wake_ups_loses_no_conversation(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, twilio: TwilioStandin,
        workers: list[Process], worker_env: dict[str, str]) -> None:
    """SIGKILL takes the wake-ups a worker held in memory with it: the conversations they were for
    are answered all the same, once each (the sweeper wakes them)."""
    # Given a worker of one thread busy on one conversation, holding another's wake-up, a third waiting
    engine.delay = 3.0
    workers.append(start_worker(worker_env, processes=1, threads=1))
    send(redis, engine_bot, "first", sender=SENDERS[0])
    engine.wait_for_calls(1)
    for sender in SENDERS[1:]:
        send(redis, engine_bot, "second", sender=sender)
    time.sleep(0.5)
    assert 1 == len(queued_kicks(redis))
    # When it is killed and another takes its place
    workers[0].kill()
    engine.delay = 0.0
    workers.append(start_worker(worker_env, processes=1, threads=4))
    # Then every conversation is answered, once
    twilio.wait_for(3, timeout=RECOVERY_LIMIT)
    time.sleep(1.0)  # room for a duplicate to show up, were one coming
    assert [["reply to first"], ["reply to second"], ["reply to second"]] == \
        [bodies_to(twilio, sender) for sender in SENDERS]
