"""Conversations: inbox drained in order, one message at a time, replies queued once, crashes resumed."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest
import redis as redis_lib
import structlog

from cli.twilio_standin import TwilioStandin
from shared import keys, messagelog
from shared.bots import Bot, BotStore
from shared.conversations import INBOUND, accept_inbound, queue_replies, replies_from
from shared.db import transaction
from shared.tasks import OUTBOUND_QUEUE, kick_conversation, kick_delivery
from tests.conftest import queued_kicks
from tests.support.messagelog import log_written
from tests.support.fake_engine import FakeEngine
from worker.locks import Lease

SENDER, OTHER_SENDER = "+15551230001", "+15551230002"


@pytest.fixture(autouse=True)
def _actors_declared(broker: dramatiq.Broker) -> None:
    """worker.conversation declares its actor on import: only once worker.app installed the test broker."""


def drain(redis: redis_lib.Redis, conversation: str) -> None:
    from worker.conversation import drain as drain_conversation

    drain_conversation(redis, conversation)


@pytest.fixture
def engine_bot(bot: Bot, store: BotStore, engine: FakeEngine) -> Bot:
    return store.update(bot.id, {"engine-url": engine.url})


def accept(redis: redis_lib.Redis, bot: Bot, body: str, sender: str = SENDER, **extra: Any) -> dict[str, Any]:
    """What the webhook does with an inbound SMS: store it on the conversation's inbox, which wakes a
    worker when the inbox was empty."""
    message = INBOUND.load({
        "sid": f"SM{time.time_ns():032x}", "bot_id": bot.id, "sender": sender, "to": bot.number, "body": body,
        "received_at": time.time(), **extra,
    })
    assert accept_inbound(redis, message)
    return message


def log_entries(conversation: str) -> list[dict[str, Any]]:
    """The conversation's message log, oldest first, read from the database the worker writes."""
    from worker.deps import get_engine, get_redis

    log_written(get_redis(), get_engine())
    bot_id, person = keys.split_conversation_id(conversation)
    with get_engine().connect() as connection:
        return messagelog.read(connection, bot_id, person, limit=messagelog.MAX_LIMIT).items


def outbox_texts(conversation: str) -> list[str]:
    """The replies queued for the conversation, in order (from the log: the sender empties the outbox)."""
    return [entry["text"] for entry in log_entries(conversation) if entry["direction"] == "out"]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


def test_messages_reach_the_engine_one_at_a_time_in_the_order_received(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, worker: dramatiq.Worker) -> None:
    """However many threads and kicks, one conversation's messages reach the engine singly, in order."""
    # Given a slowish engine and ten messages, each kicked twice as the webhook and a retry would
    engine.delay = 0.05
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    texts = [f"message {n}" for n in range(10)]
    for text in texts:
        accept(redis, engine_bot, text)
        kick_conversation(conversation)
        kick_conversation(conversation)

    # When the four worker threads drain them
    engine.wait_for_calls(10)
    wait_until(lambda: len(outbox_texts(conversation)) == 10)

    # Then the engine saw them in order, never two at a time, and the replies queued in that order
    assert texts == [call.text for call in engine.calls]
    assert 1 == engine.most_in_flight(SENDER)
    assert [f"reply to {text}" for text in texts] == outbox_texts(conversation)


def test_concurrent_bursts_leave_no_message_without_a_worker(
        redis: redis_lib.Redis, store: BotStore, engine_bot: Bot, engine: FakeEngine, worker: dramatiq.Worker) -> None:
    """Messages stored from many threads while workers drain are all answered, once and in order,
    and every conversation settles: a message stored with no wake-up of its own is never left waiting
    for the sweeper (the wait below is shorter than its STALE_SECONDS)."""
    # Given a fast sender number (and no cap on the replies a person gets a minute) and an engine
    # that takes a moment per answer
    store.update(engine_bot.id, {"messages-per-second": 1000, "max-replies-per-minute": 0})
    engine.delay = 0.005
    senders = [f"+1555124{n:04d}" for n in range(5)]
    texts = {sender: [f"{sender[-4:]}-{n}" for n in range(20)] for sender in senders}

    # When five people text twenty messages each, at uneven intervals, all at once
    def texting(sender: str) -> None:
        for n, text in enumerate(texts[sender]):
            accept(redis, engine_bot, text, sender=sender, sid=f"SM{uuid.uuid4().hex}")
            time.sleep(0.002 * (n % 4))

    threads = [threading.Thread(target=texting, args=(sender,)) for sender in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # and, once all is answered, one more each, to an idle conversation
    wait_until(lambda: redis.zcard(keys.PENDING) == 0, timeout=12)
    for sender in senders:
        texts[sender].append(f"{sender[-4:]}-last")
        accept(redis, engine_bot, texts[sender][-1], sender=sender, sid=f"SM{uuid.uuid4().hex}")

    # Then each conversation is answered in order, once per message, and leaves the pending set
    conversations = {sender: keys.conversation_id(engine_bot.id, sender) for sender in senders}
    wait_until(lambda: redis.zcard(keys.PENDING) == 0, timeout=12)
    for sender in senders:
        assert texts[sender] == [call.text for call in engine.calls if call.sender == sender]
        assert [f"reply to {text}" for text in texts[sender]] == outbox_texts(conversations[sender])


def test_different_conversations_proceed_in_parallel(redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine,
                                                     worker: dramatiq.Worker) -> None:
    """A conversation stuck on a slow answer does not hold up another sender's conversation."""
    # Given an engine that holds the first sender's answer until released
    release = threading.Event()

    def answer(payload: dict[str, Any]) -> list[dict[str, Any]]:
        if payload["sender"] == SENDER:
            release.wait(10)
        return [{"recipient_id": payload["sender"], "text": "ok"}]

    engine.answer = answer
    accept(redis, engine_bot, "slow")
    engine.wait_for_calls(1)

    # When another sender writes meanwhile
    accept(redis, engine_bot, "fast", sender=OTHER_SENDER)

    # Then that one is answered while the first is still waiting
    wait_until(lambda: outbox_texts(keys.conversation_id(engine_bot.id, OTHER_SENDER)) == ["ok"])
    assert [] == outbox_texts(keys.conversation_id(engine_bot.id, SENDER))
    release.set()
    wait_until(lambda: outbox_texts(keys.conversation_id(engine_bot.id, SENDER)) == ["ok"])


def test_two_bots_are_answered_by_their_own_engines(redis: redis_lib.Redis, store: BotStore, engine_bot: Bot,
                                                    engine: FakeEngine, worker: dramatiq.Worker) -> None:
    """Each bot's messages go to its own engine; a bot without one gets the echo engine."""
    echo_bot = store.create({"name": "echo", "twilio-account-sid": engine_bot.account_sid,
                             "twilio-auth-token": "x" * 32, "main-phone-number": "+15005550007"})
    for bot in (engine_bot, echo_bot):
        accept(redis, bot, "hi")

    wait_until(lambda: all(outbox_texts(keys.conversation_id(b.id, SENDER)) for b in (engine_bot, echo_bot)))

    assert ["reply to hi"] == outbox_texts(keys.conversation_id(engine_bot.id, SENDER))
    assert ["echo: hi"] == outbox_texts(keys.conversation_id(echo_bot.id, SENDER))


def test_inbound_and_replies_are_kept_in_the_message_log(redis: redis_lib.Redis, engine_bot: Bot,
                                                         engine: FakeEngine) -> None:
    """The inbound is logged as received, then its replies as outbound entries, oldest first."""
    message = accept(redis, engine_bot, "hola", media=[{"url": "https://m.example/1", "content_type": "image/png"}])
    conversation = keys.conversation_id(engine_bot.id, SENDER)

    drain(redis, conversation)

    entries = log_entries(conversation)
    assert [("in", "hola"), ("out", "reply to hola")] == [(e["direction"], e["text"]) for e in entries]
    assert (["person", "engine"], f"{message['sid']}-0") == ([e["origin"] for e in entries], entries[1]["id"])
    assert (message["sid"], "received", message["received_at"]) == (entries[0]["sid"], entries[0]["status"],
                                                                     entries[0]["at"])
    assert [{"url": "https://m.example/1", "content_type": "image/png"}] == entries[0]["media"]


def test_a_crashed_workers_message_is_resumed_first_and_logged_once(redis: redis_lib.Redis, engine_bot: Bot,
                                                                    engine: FakeEngine) -> None:
    """A message left in processing by a dead worker is answered before newer ones, without a second log entry."""
    from worker.deps import get_engine

    # Given a worker that moved the first message to processing, logged it with its reply, and died
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    first = accept(redis, engine_bot, "first")
    accept(redis, engine_bot, "second")
    redis.lmove(keys.inbox(conversation), keys.processing(conversation), "LEFT", "RIGHT")
    [reply] = replies_from(conversation, SENDER, "reply to first", in_reply_to=first["sid"])
    reply["id"] = f"{first['sid']}-0"
    with transaction(get_engine()) as connection:
        messagelog.record_exchange(connection, first, [reply], engine_bot.number)

    # When another worker drains the conversation
    drain(redis, conversation)

    # Then the dead worker's message went first, and the log holds each message once (in time order)
    assert ["first", "second"] == [call.text for call in engine.calls]
    texts = [(e["direction"], e["text"]) for e in log_entries(conversation)]
    assert [("in", "first"), ("in", "second"), ("out", "reply to first"), ("out", "reply to second")] == texts
    assert 0 == redis.llen(keys.processing(conversation))


def test_a_message_whose_replies_were_queued_is_not_answered_again(redis: redis_lib.Redis, engine_bot: Bot,
                                                                   engine: FakeEngine) -> None:
    """Redelivered kicks after the replies were queued neither call the engine nor queue replies again."""
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "once")

    for _ in range(3):
        drain(redis, conversation)

    assert 1 == len(engine.calls)
    assert ["reply to once"] == outbox_texts(conversation)


def test_a_held_conversation_is_left_to_its_holder(redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine,
                                                   broker: dramatiq.Broker) -> None:
    """While another worker holds the conversation's lease, a kick does nothing to it."""
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "wait")
    holder = Lease(redis, keys.conversation_lock(conversation))
    assert holder.acquire()
    try:
        drain(redis, conversation)
    finally:
        holder.release()

    assert [] == engine.calls
    assert 1 == redis.llen(keys.inbox(conversation))


def test_a_message_landing_as_the_holder_lets_go_is_picked_up(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, broker: dramatiq.Broker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message that came after the holder's last look, and whose wake-up was refused because the
    lease was still held, is woken for by the holder's look after letting go."""
    from worker import conversation as handler

    # (An engine with nothing to say: with a reply to send, the step finishing it lets go, below.)
    monkeypatch.setattr(engine, "answer", lambda payload: [])
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "first")
    redis.delete(keys.WAKE_UPS)  # its wake-up is the drain below
    handle = handler.handle_message
    late: list[dict[str, Any]] = []

    def handle_then_receive(*args: Any) -> bool:
        more = handle(*args)  # its last look: the inbox was empty
        if not late:
            # Given a second message lands just after the holder found the inbox empty,
            late.append(accept(redis, engine_bot, "second"))
            # and its wake-up reaches another worker while the lease is still held
            drain(redis, conversation)
            redis.delete(keys.WAKE_UPS)
        return more

    monkeypatch.setattr(handler, "handle_message", handle_then_receive)
    # When the holder finishes the first message and lets go
    drain(redis, conversation)
    # Then "second" waits on the inbox and the holder has woken a worker for it
    assert (["first"], 1, [conversation]) == (
        [call.text for call in engine.calls], redis.llen(keys.inbox(conversation)),
        [kick.args[0] for kick in queued_kicks(redis)])


def test_a_message_landing_while_the_last_reply_is_sent_is_answered_by_the_same_drain(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, broker: dramatiq.Broker,
        twilio: TwilioStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step that finishes a drain's last reply lets the conversation go only if no message
    waits: one landing while that reply was being sent wakes nobody (the lease is held), and the
    drain, still holding the conversation, answers it next; then lets go with nothing woken."""
    from worker import conversation as handler

    twilio.reset()
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "first")
    redis.delete(keys.WAKE_UPS)  # its wake-up is the drain below
    deliver = handler.deliver_taken

    def receive_then_deliver(*args: Any, **kwargs: Any) -> None:
        # Given "second" lands after "first"'s replies were queued, while its reply is being sent
        if not woken and redis.llen(keys.inbox(conversation)) == 0 and len(engine.calls) == 1:
            accept(redis, engine_bot, "second")
            woken.extend(queued_kicks(redis) or [None])  # [None]: no kick, the holder goes on
        deliver(*args, **kwargs)

    woken: list[Any] = []

    monkeypatch.setattr(handler, "deliver_taken", receive_then_deliver)
    # When the holder drains, answering "first"
    drain(redis, conversation)
    # Then both were answered in order ("second"'s reply waits for the number's next slot, a second
    # on), nothing was woken, and the conversation is free
    twilio.wait_for(1)
    assert (["first", "second"], ["reply to first"]) == (
        [call.text for call in engine.calls], [message.body for message in twilio.messages])
    assert (0, None, [None], [], 1) == (redis.llen(keys.inbox(conversation)),
                                        redis.get(keys.conversation_lock(conversation)), woken,
                                        [kick.args[0] for kick in queued_kicks(redis)],
                                        redis.llen(keys.outbox(conversation)))


def test_a_drain_whose_last_reply_was_sent_has_let_go_and_settled(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, broker: dramatiq.Broker,
        twilio: TwilioStandin) -> None:
    """With nothing waiting, the conversation is let go and leaves the pending set (what the
    sweeper watches) in the step that finishes its reply."""
    twilio.reset()
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "hola")
    redis.delete(keys.WAKE_UPS)

    drain(redis, conversation)

    twilio.wait_for(1)
    assert (None, None, None, []) == (redis.get(keys.conversation_lock(conversation)),
                                      redis.get(keys.outbox_lock(conversation)),
                                      redis.zscore(keys.PENDING, conversation), queued_kicks(redis))


def test_the_last_reply_s_step_leaves_alone_a_conversation_another_worker_took(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, broker: dramatiq.Broker,
        twilio: TwilioStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain whose lease lapsed while its last reply was being sent (a pause) and passed to
    another worker lets nothing go: the other worker's lease stands."""
    from worker import outbound

    twilio.reset()
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "hola")
    redis.delete(keys.WAKE_UPS)
    send = outbound.send_sms

    def taken_over_then_send(*args: Any, **kwargs: Any) -> Any:
        # Given the conversation's lease passes to another worker while the reply goes out
        redis.set(keys.conversation_lock(conversation), "another worker's token", px=30_000)
        return send(*args, **kwargs)

    monkeypatch.setattr(outbound, "send_sms", taken_over_then_send)
    # When the drain finishes its reply
    drain(redis, conversation)
    # Then the reply went, and the other worker still holds the conversation
    twilio.wait_for(1)
    assert "another worker's token" == redis.get(keys.conversation_lock(conversation))


def test_a_reply_queued_behind_one_waiting_for_its_slot_waits_behind_it(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, worker: dramatiq.Worker,
        twilio: TwilioStandin) -> None:
    """An outbox holding a reply (scheduled for its pacing slot, nobody sending it right now) is
    not idle: the answer to a new text is queued after that reply, not sent ahead of it."""
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    # Given an outbox whose head waits for its turn
    [waiting] = replies_from(conversation, SENDER, "waiting for its slot")
    queue_replies(redis, conversation, [waiting])
    # When a new text is answered meanwhile
    accept(redis, engine_bot, "hola")
    redis.delete(keys.WAKE_UPS)
    drain(redis, conversation)
    # Then nothing went ahead of the waiting reply; once it goes, the answer follows it
    assert [] == [message.body for message in twilio.messages]
    kick_delivery(conversation, waiting["id"])
    twilio.wait_for(2)
    assert ["waiting for its slot", "reply to hola"] == [message.body for message in twilio.messages]


def test_a_long_run_hands_over_and_is_kicked_again(redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine,
                                                   monkeypatch: pytest.MonkeyPatch, worker: dramatiq.Worker) -> None:
    """One actor run handles a bounded share, then re-kicks itself so the rest is still answered."""
    monkeypatch.setattr("worker.conversation.MAX_MESSAGES_PER_RUN", 2)
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    for n in range(5):
        accept(redis, engine_bot, f"m{n}")

    wait_until(lambda: len(outbox_texts(conversation)) == 5)
    assert [f"m{n}" for n in range(5)] == [call.text for call in engine.calls]


def test_a_long_answer_becomes_several_replies_in_order(redis: redis_lib.Redis, engine_bot: Bot,
                                                        engine: FakeEngine) -> None:
    """Text over 1600 characters is queued as several messages, split at word boundaries, in order."""
    long_text = " ".join(f"palabra{n}" for n in range(400))  # ~3.9k characters
    engine.answer = lambda payload: [{"recipient_id": payload["sender"], "text": long_text}]
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "cuéntame")

    drain(redis, conversation)

    parts = outbox_texts(conversation)
    assert len(parts) >= 3 and all(len(part) <= 1600 for part in parts)
    assert long_text.split() == " ".join(parts).split()


def test_an_opt_out_reaches_the_engine_as_an_event_and_its_reply_is_queued(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine) -> None:
    """STOP goes to the engine with metadata.event=opt_out; the sender decides whether to send its reply."""
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "STOP", event="opt_out")

    drain(redis, conversation)

    assert ["opt_out"] == [call.payload["metadata"]["event"] for call in engine.calls]
    assert ["reply to STOP"] == outbox_texts(conversation)


def test_a_message_for_a_deleted_bot_is_dropped(redis: redis_lib.Redis, store: BotStore, engine_bot: Bot,
                                                engine: FakeEngine) -> None:
    """A bot deleted after its message was accepted: the message is dropped (kept in the log as received),
    nothing is queued or stranded."""
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "anyone there?")
    store.delete(engine_bot.id)

    drain(redis, conversation)

    assert [] == engine.calls
    assert [("in", "anyone there?", "received")] == [(e["direction"], e["text"], e["status"])
                                                     for e in log_entries(conversation)]
    assert (0, 0, 0) == (redis.llen(keys.inbox(conversation)), redis.llen(keys.processing(conversation)),
                         redis.llen(keys.outbox(conversation)))
    assert redis.zscore(keys.PENDING, conversation) is None


def test_a_failing_engine_gets_the_fallback_and_the_conversation_moves_on(
        redis: redis_lib.Redis, store: BotStore, engine_bot: Bot, engine: FakeEngine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After the engine's retries run out the fallback is queued and the next message is answered."""
    monkeypatch.setattr("worker.engine.BACKOFF_SECONDS", (0.05,))
    store.update(engine_bot.id, {"fallback-message": "Lo siento, vuelve a intentar."})
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    engine.fail_next(2)  # both tries of the first message
    accept(redis, engine_bot, "first")
    accept(redis, engine_bot, "second")

    drain(redis, conversation)

    assert ["Lo siento, vuelve a intentar.", "reply to second"] == outbox_texts(conversation)


def test_the_first_reply_is_sent_from_the_conversations_own_thread(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, twilio: TwilioStandin) -> None:
    """With no worker consuming the outbound queue, draining the conversation alone delivers the answer."""
    # Given a message and nothing but this thread to handle it
    twilio.reset()
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "hola")

    # When its conversation is drained
    drain(redis, conversation)

    # Then the reply reached Twilio, with no send_reply message left behind for a worker
    assert [("reply to hola", SENDER)] == [(m.body, m.to) for m in twilio.messages]
    assert 0 == redis.llen(keys.outbox(conversation))
    assert 0 == redis.llen(f"dramatiq:{OUTBOUND_QUEUE}")


def test_a_bot_changed_between_two_messages_answers_the_second_as_changed(
        redis: redis_lib.Redis, store: BotStore, engine_bot: Bot, engine: FakeEngine) -> None:
    """A registry change is seen by the very next message: the worker serves no stale copy of a bot."""
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    accept(redis, engine_bot, "first")
    drain(redis, conversation)

    # When the bot's engine is removed, leaving it to the echo engine
    store.update(engine_bot.id, {"engine-url": None})
    accept(redis, engine_bot, "second")
    drain(redis, conversation)

    assert ["reply to first", "echo: second"] == outbox_texts(conversation)


def test_every_event_of_a_hop_names_its_message_bot_and_conversation(
        redis: redis_lib.Redis, engine_bot: Bot, twilio: TwilioStandin) -> None:
    """engine.called, conversation.answered and outbound.sent all carry the MessageSid, bot id and conversation."""
    # Given log events captured with the context they are bound in
    captured = structlog.testing.LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, captured])
    twilio.reset()
    conversation = keys.conversation_id(engine_bot.id, SENDER)
    message = accept(redis, engine_bot, "hola")
    try:
        # When a worker handles the message (and sends the first reply from its thread)
        drain(redis, conversation)
    finally:
        structlog.reset_defaults()
    # Then each hop's event names all three, and the send also names Twilio's SID for the reply
    events = {entry["event"]: entry for entry in captured.entries}
    for name in ("engine.called", "conversation.answered", "outbound.sent"):
        assert (message["sid"], engine_bot.id, conversation) == (
            events[name]["message_sid"], events[name]["bot_id"], events[name]["conversation"]), name
    assert [events["outbound.sent"]["twilio_sid"]] == [sent.sid for sent in twilio.wait_for(1)]
    assert message["sid"] == events["outbound.sent"]["in_reply_to"]
