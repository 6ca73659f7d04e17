"""Crash recovery and ordering across real worker processes, started as the Procfile starts them.

A worker SIGKILLed mid-message loses nothing and repeats nothing; a dyno shutdown lets the
message in flight finish; conversations keep their order
under two processes of several threads each; a failing engine costs one fallback, not the conversation.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis as redis_lib

from cli.twilio_standin import TwilioStandin
from shared import keys
from shared.bots import Bot, BotStore
from shared.conversations import INBOUND, accept_inbound, queue_replies, replies_from
from shared.tasks import CONVERSATIONS_QUEUE
from tests.support.fake_engine import FakeEngine
from tests.support.processes import Process, start_worker
from worker.locks import Lease

SENDER = "+15551230001"
RECOVERY_LIMIT = 60.0  # the promise for a killed worker's message


@pytest.fixture
def engine_bot(bot: Bot, store: BotStore, engine: FakeEngine) -> Bot:
    # Fast pacing, so ordering tests are not waiting on the 1 message/s default.
    return store.update(bot.id, {"engine-url": engine.url, "messages-per-second": 50})


@pytest.fixture
def workers(worker_env: dict[str, str], redis: redis_lib.Redis, twilio: TwilioStandin) -> Iterator[list[Process]]:
    """Worker processes a test starts; each is stopped (or already killed) at the end."""
    twilio.reset()
    started: list[Process] = []
    yield started
    for process in started:
        process.stop(10)


def send(redis: redis_lib.Redis, bot: Bot, body: str, sender: str = SENDER) -> None:
    """What the webhook does with an inbound SMS: store it, which wakes a worker if the inbox was empty."""
    message = INBOUND.load({"sid": f"SM{time.time_ns():032x}", "bot_id": bot.id, "sender": sender, "to": bot.number,
                            "body": body, "received_at": time.time()})
    assert accept_inbound(redis, message)


def bodies_to(twilio: TwilioStandin, recipient: str) -> list[str]:
    return [message.body for message in twilio.messages if message.to == recipient]


def test_a_worker_killed_mid_message_is_answered_by_another_without_repeats(
        redis: redis_lib.Redis, broker: dramatiq.Broker, engine_bot: Bot, engine: FakeEngine,
        twilio: TwilioStandin, workers: list[Process], worker_env: dict[str, str]) -> None:
    """SIGKILL during the engine call: a new worker answers within 60 s, each reply is sent once, order holds."""
    # Given a worker busy on a slow engine call for the first message, with a second one waiting
    engine.delay = 5.0
    workers.append(start_worker(worker_env, processes=1, threads=4))
    send(redis, engine_bot, "first")
    engine.wait_for_calls(1)
    send(redis, engine_bot, "second")

    # When the worker dies mid-call and another starts
    workers[0].kill()
    killed_at = time.time()
    engine.delay = 0.0
    workers.append(start_worker(worker_env, processes=1, threads=4))

    # Then both messages are answered, in order, once each, within the recovery limit
    twilio.wait_for(2, timeout=RECOVERY_LIMIT + 10)
    assert twilio.messages[0].received_at - killed_at < RECOVERY_LIMIT
    time.sleep(1.0)  # room for a duplicate to show up, were one coming
    assert ["reply to first", "reply to second"] == bodies_to(twilio, SENDER)
    assert ["first", "first", "second"] == [call.text for call in engine.calls]


def test_a_dyno_shutdown_lets_the_message_in_flight_finish(
        redis: redis_lib.Redis, broker: dramatiq.Broker, engine_bot: Bot, engine: FakeEngine,
        twilio: TwilioStandin, workers: list[Process], worker_env: dict[str, str]) -> None:
    """Heroku's SIGTERM to every process of the dyno, and the one Dramatiq's main process forwards,
    are one graceful stop: the message in flight is answered before the worker exits."""
    # Given a worker dyno busy on a slow engine call
    engine.delay = 3.0
    workers.append(worker := start_worker(worker_env, processes=2, threads=4))
    send(redis, engine_bot, "slow")
    engine.wait_for_calls(1)

    # When the dyno manager stops it: SIGTERM to every process at once
    assert worker.popen is not None
    os.killpg(worker.popen.pid, signal.SIGTERM)
    exit_code = worker.popen.wait(30)

    # Then the reply went out first, and no worker process was killed
    assert ["reply to slow"] == bodies_to(twilio, SENDER)
    assert (0, False) == (exit_code, "Killing worker process" in worker.log)


def test_outside_a_dramatiq_worker_process_sigterm_is_left_alone() -> None:
    """Importing the worker elsewhere (a test, a shell) keeps the process's own SIGTERM handler."""
    from worker.shutdown import take_repeated_sigterm_as_one

    before = signal.getsignal(signal.SIGTERM)
    assert (False, before) == (take_repeated_sigterm_as_one(), signal.getsignal(signal.SIGTERM))


def test_order_holds_per_conversation_under_two_worker_processes(
        redis: redis_lib.Redis, broker: dramatiq.Broker, store: BotStore, engine_bot: Bot, engine: FakeEngine,
        twilio: TwilioStandin, workers: list[Process], worker_env: dict[str, str]) -> None:
    """Two bots, many senders, two processes of eight threads: each conversation's replies leave in order."""
    # Given two bots and five senders each, writing eight messages apiece, interleaved
    engine.delay = 0.01
    second_bot = store.create({"name": "second", "twilio-account-sid": engine_bot.account_sid,
                               "twilio-auth-token": "y" * 32, "main-phone-number": "+15005550009",
                               "engine-url": engine.url, "messages-per-second": 50})
    senders = [f"+1555123{n:04d}" for n in range(10)]
    bot_of = {sender: (engine_bot if n % 2 else second_bot) for n, sender in enumerate(senders)}
    workers.append(start_worker(worker_env, processes=2, threads=8))

    # When they all write at once
    for round_ in range(8):
        for sender in senders:
            send(redis, bot_of[sender], f"{sender[-4:]}-{round_}", sender=sender)

    # Then every conversation reached the engine one message at a time, and its replies left in order
    twilio.wait_for(80, timeout=60)
    for sender in senders:
        expected = [f"reply to {sender[-4:]}-{round_}" for round_ in range(8)]
        assert expected == bodies_to(twilio, sender)
        assert 1 == engine.most_in_flight(sender)
        assert {bot_of[sender].number} == {m.from_ for m in twilio.messages if m.to == sender}


def test_an_engine_down_then_recovering_costs_one_fallback_not_the_conversation(
        redis: redis_lib.Redis, broker: dramatiq.Broker, store: BotStore, engine_bot: Bot, engine: FakeEngine,
        twilio: TwilioStandin, workers: list[Process], worker_env: dict[str, str]) -> None:
    """Retries exhausted: the fallback goes out and the next message, once the engine is back, is answered."""
    # Given an engine that is down, and a bot with a fallback message
    store.update(engine_bot.id, {"fallback-message": "Volvemos enseguida."})
    engine.down()
    workers.append(start_worker(worker_env, processes=1, threads=4))

    # When a message arrives while it is down, and another once it is back
    send(redis, engine_bot, "first")
    twilio.wait_for(1, timeout=30)
    engine.up()
    engine.fail_next(2)  # a brief relapse the retries absorb
    send(redis, engine_bot, "second")

    # Then the first got the fallback and the second the engine's answer
    twilio.wait_for(2, timeout=30)
    assert ["Volvemos enseguida.", "reply to second"] == bodies_to(twilio, SENDER)


def test_replies_a_dead_worker_queued_but_never_kicked_are_sent_by_a_workers_sweeper(
        redis: redis_lib.Redis, broker: dramatiq.Broker, engine_bot: Bot, twilio: TwilioStandin,
        workers: list[Process], worker_env: dict[str, str]) -> None:
    """Replies left on an outbox with no send_reply message anywhere reach Twilio, in order, within one sweep."""
    from worker.sweeper import INTERVAL_SECONDS

    # Given two replies a worker queued a minute ago, dying before it kicked their delivery
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    replies = replies_from(conversation, SENDER, "one") + replies_from(conversation, SENDER, "two")
    queue_replies(redis, conversation, replies)
    stale(redis, conversation)

    # When a worker process starts, with nothing on any Dramatiq queue to redeliver
    workers.append(start_worker(worker_env, processes=1, threads=4))

    # Then its sweeper finds the outbox and both replies go out, in order, once each
    twilio.wait_for(2, timeout=2 * INTERVAL_SECONDS + 5)
    time.sleep(0.5)  # room for a duplicate to show up, were one coming
    assert ["one", "two"] == bodies_to(twilio, SENDER)


# --- The sweeper, against Redis, without processes ---


def stale(redis: redis_lib.Redis, conversation: str) -> None:
    redis.zadd(keys.PENDING, {conversation: time.time() - 60})


def queued_actor_calls(redis: redis_lib.Redis, queue: str) -> list[tuple[str, list[Any]]]:
    import json

    if queue == CONVERSATIONS_QUEUE:  # wake-ups: their bodies, in a list (shared/wakeups.py)
        bodies = redis.lrange(keys.WAKE_UPS, 0, -1)
    else:
        ids = redis.lrange(f"dramatiq:{queue}", 0, -1)
        bodies = redis.hmget(f"dramatiq:{queue}.msgs", ids) if ids else []
    return [(json.loads(b)["actor_name"], json.loads(b)["args"]) for b in bodies if b]


def test_the_sweeper_kicks_a_stalled_conversation_nobody_holds(redis: redis_lib.Redis, broker: dramatiq.Broker,
                                                               bot: Bot) -> None:
    """A message left in processing with its lease lapsed is kicked again, once per stale period."""
    from worker.sweeper import sweep

    conversation = keys.conversation_id(bot.id, SENDER)
    redis.rpush(keys.processing(conversation), "{}")
    stale(redis, conversation)

    kicked = [sweep(redis, broker=broker), sweep(redis, broker=broker)]

    assert [1, 0] == kicked  # the second pass finds it freshly kicked
    assert [("handle_conversation", [conversation])] == queued_actor_calls(redis, CONVERSATIONS_QUEUE)


def test_the_sweeper_leaves_a_conversation_whose_worker_is_alive(redis: redis_lib.Redis, broker: dramatiq.Broker,
                                                                 bot: Bot) -> None:
    """A held lease means a live worker is on it: no kick."""
    from worker.sweeper import sweep

    conversation = keys.conversation_id(bot.id, SENDER)
    redis.rpush(keys.inbox(conversation), "{}")
    stale(redis, conversation)
    lease = Lease(redis, keys.conversation_lock(conversation))
    assert lease.acquire()
    try:
        assert 0 == sweep(redis, broker=broker)
    finally:
        lease.release()
    assert [] == queued_actor_calls(redis, CONVERSATIONS_QUEUE)


def test_the_sweeper_kicks_a_stalled_outbox_at_its_head(redis: redis_lib.Redis, broker: dramatiq.Broker,
                                                        bot: Bot) -> None:
    """Replies queued by a worker that died before kicking their delivery are sent after all."""
    from worker.sweeper import sweep

    conversation = keys.conversation_id(bot.id, SENDER)
    replies = replies_from(conversation, SENDER, "one") + replies_from(conversation, SENDER, "two")
    queue_replies(redis, conversation, replies)
    stale(redis, conversation)

    assert 1 == sweep(redis, broker=broker)
    assert [("send_reply", [conversation, replies[0]["id"]])] == queued_actor_calls(redis, "outbound")


def test_the_sweeper_forgets_a_conversation_with_nothing_left(redis: redis_lib.Redis, broker: dramatiq.Broker,
                                                              bot: Bot) -> None:
    """A conversation with empty inbox, processing list and outbox leaves the pending set."""
    from worker.sweeper import sweep

    conversation = keys.conversation_id(bot.id, SENDER)
    stale(redis, conversation)

    assert 0 == sweep(redis, broker=broker)
    assert redis.zscore(keys.PENDING, conversation) is None
