"""Fencing: a worker whose lease lapsed (a long pause) and passed to another queues nothing and sends nothing."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import dramatiq
import redis as redis_lib
import pytest

from cli.twilio_standin import TwilioStandin
from shared import keys
from shared.bots import Bot
from shared.conversations import FENCED, new_reply, queue_replies
from tests.support.fake_engine import FakeEngine
from tests.support.processes import Process, start_worker
from tests.test_crash_recovery import SENDER, bodies_to, engine_bot, send, workers  # noqa: F401 (fixtures)
from worker.locks import Lease

__all__ = ["engine_bot", "workers"]


def test_a_stale_holder_queues_no_replies_and_leaves_the_message_to_the_new_one(
        redis: redis_lib.Redis, bot: Bot) -> None:
    """queue_replies with a lease token that is no longer the conversation's changes nothing and says FENCED."""
    conversation = keys.conversation_id(bot.id, SENDER)
    redis.rpush(keys.processing(conversation), "the message in hand")
    redis.set(keys.conversation_lock(conversation), "the new holder")

    answer = queue_replies(redis, conversation, [new_reply(conversation, SENDER, "late")],
                           done_inbound="the message in hand", lease_token="the old holder", log_record="{}")

    assert FENCED == answer
    assert (["the message in hand"], 0, 0) == (redis.lrange(keys.processing(conversation), 0, -1),
                                               redis.llen(keys.outbox(conversation)), redis.llen(keys.LOG_OUTBOX))


@pytest.mark.parametrize("refused", ["fenced", "erased"])
def test_an_answer_refused_at_its_queueing_leaves_no_reply_behind(
        redis: redis_lib.Redis, bot: Bot, broker: dramatiq.Broker, refused: str) -> None:
    """The conversation thread's step that queues an answer and takes its first turn (queue_and_take):
    refused because the lease passed on, or because the conversation was erased while the engine
    was asked, it leaves no reply record (an erased conversation's text would outlive its erasure)
    and counts nothing toward the person's replies this minute."""
    from worker.outbound import queue_and_take

    conversation = keys.conversation_id(bot.id, SENDER)
    redis.set(keys.conversation_lock(conversation), "the new holder" if refused == "fenced" else "ours")
    if refused == "fenced":
        redis.rpush(keys.processing(conversation), "the message in hand")  # erased: the erase emptied it
    replies = [new_reply(conversation, SENDER, "late"), new_reply(conversation, SENDER, "later")]

    queued = queue_and_take(redis, conversation, replies, bot, done_inbound="the message in hand",
                            log_record="{}", lease_token="ours")

    assert (refused == "fenced", refused == "erased", None) == (queued.fenced, queued.erased, queued.head)
    assert ({}, None, 0, 0) == (redis.hgetall(keys.replies(conversation)), redis.get(keys.replies_this_minute(conversation)),
                                redis.llen(keys.outbox(conversation)), redis.llen(keys.LOG_OUTBOX))


def test_a_sender_whose_outbox_lease_passed_on_sends_nothing(
        redis: redis_lib.Redis, bot: Bot, twilio: TwilioStandin, broker: dramatiq.Broker,
        logs: list[dict[str, object]]) -> None:
    """A reply at the head of its outbox is not sent by a worker whose outbox lease another worker now holds."""
    from worker import outbound

    conversation = keys.conversation_id(bot.id, SENDER)
    twilio.reset()
    [reply_id] = [queue_replies(redis, conversation, [new_reply(conversation, SENDER, "once")])]
    stale = Lease(redis, keys.outbox_lock(conversation))
    assert stale.acquire()
    redis.set(stale.key, "another worker's token")  # ours lapsed and was taken

    head = outbound._take_head(redis, conversation, reply_id, Lease(redis, "test:unused"))
    step = outbound._work_head(redis, conversation, head, stale, outbound.SHORT_WAIT_SECONDS)

    assert (None, []) == (step.kick, twilio.attempts)
    assert ["outbound.lease_lost"] == [e["event"] for e in logs if e["event"] == "outbound.lease_lost"]
    assert [reply_id] == redis.lrange(keys.outbox(conversation), 0, -1)


def test_a_worker_frozen_past_its_lease_sends_nothing_when_it_wakes(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, twilio: TwilioStandin,  # noqa: F811
        workers: list[Process], worker_env: dict[str, str]) -> None:  # noqa: F811
    """SIGSTOP a worker mid engine call past its lease, let another answer, SIGCONT it: the person gets one reply."""
    # Given a worker frozen in the middle of an engine call, for longer than its lease lives
    engine.delay = 4.0
    workers.append(start_worker(worker_env, processes=1, threads=4))
    frozen = workers[0]
    send(redis, engine_bot, "first")
    engine.wait_for_calls(1)
    assert frozen.popen is not None
    os.killpg(frozen.popen.pid, signal.SIGSTOP)
    try:
        # When another worker takes the conversation over and answers
        engine.delay = 0.0
        workers.append(start_worker(worker_env, processes=1, threads=4))
        twilio.wait_for(1, timeout=60)
    finally:
        # and the frozen one wakes up, its engine call answered meanwhile
        os.killpg(frozen.popen.pid, signal.SIGCONT)
    time.sleep(6.0)  # its engine answer arrives (4 s) and it tries to queue what it was given

    # Then the person got the reply once, and the woken worker knew it had lost the conversation
    assert ["reply to first"] == bodies_to(twilio, SENDER)
    assert "lease_lost" in frozen.log
    assert "conversation.answered" not in frozen.log
