"""One inbound text cannot run up unbounded SMS: an engine's answer is capped in replies and segments."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import dramatiq
import pytest
import redis as redis_lib
from hypothesis import HealthCheck, given, settings, strategies as st

from cli.twilio_standin import TwilioStandin
from shared import keys
from shared.bots import Bot, Limits
from shared.conversations import ELLIPSIS, INBOUND, MAX_REPLIES_PER_ANSWER, MAX_SEGMENTS_PER_ANSWER, capped, new_reply
from shared.segments import count_segments
from tests.support.fake_engine import FakeEngine
from tests.test_crash_recovery import SENDER, bodies_to, engine_bot, send  # noqa: F401 (fixture)
from worker.logdrain import exchange_record

__all__ = ["engine_bot"]


def answering(*texts: str) -> Any:
    return lambda payload: [{"recipient_id": payload["sender"], "text": text} for text in texts]


@pytest.mark.parametrize("items", [11, 2_000])  # 2,000 items: about 110 KB, within the engine's 256 KiB
def test_an_answer_of_many_items_sends_ten(redis: redis_lib.Redis, engine_bot: Bot,  # noqa: F811
                                           engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker,
                                           logs: list[dict[str, object]], items: int) -> None:
    """2,000 answer items for one inbound text: the first ten go out, in order, and the cut is logged."""
    engine.answer = answering(*(f"item {n}" for n in range(items)))
    send(redis, engine_bot, "hola")
    twilio.wait_for(MAX_REPLIES_PER_ANSWER, timeout=30)
    time.sleep(1.0)  # room for an eleventh, were one coming
    assert [f"item {n}" for n in range(MAX_REPLIES_PER_ANSWER)] == bodies_to(twilio, SENDER)
    assert any(event["event"] == "conversation.answer_capped" for event in logs)


def test_a_long_text_is_cut_at_a_word_within_the_segment_budget(
        redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, twilio: TwilioStandin,  # noqa: F811
        worker: dramatiq.Worker) -> None:
    """A 200 KB text (a 1 MB answer is over the engine's 256 KiB cap) becomes at most 30 segments of
    SMS, its last cut at a word with an ellipsis."""
    engine.answer = answering("palabra " * 25_000)
    send(redis, engine_bot, "hola")
    twilio.wait_for(1, timeout=30)
    time.sleep(1.5)
    sent = bodies_to(twilio, SENDER)
    assert sum(count_segments(body) for body in sent) <= MAX_SEGMENTS_PER_ANSWER
    assert sent[-1].endswith("palabra" + ELLIPSIS)


def test_answers_within_the_caps_are_untouched() -> None:
    """Ten short replies fit: nothing is cut or marked."""
    replies = [new_reply("1:+15551230000", "+15551230000", f"reply {n}") for n in range(MAX_REPLIES_PER_ANSWER)]
    assert (replies, 0, False) == (lambda c: (c.replies, c.replies_cut, c.truncated))(capped(replies))


def test_one_word_longer_than_the_budget_is_cut_by_characters() -> None:
    """A single 'word' of 10,000 characters still fits the budget, with an ellipsis."""
    [reply] = capped([new_reply("1:+15551230000", "+15551230000", "x" * 10_000)], max_segments=2).replies
    assert count_segments(reply["text"]) <= 2 and reply["text"].endswith(ELLIPSIS)


# Anything JSON can say, as an engine's answer: items of any type, texts of any size and alphabet,
# nesting, huge numbers.
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80), st.floats(allow_nan=False),
                     st.text(max_size=50))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=20)
_TEXTS = st.one_of(st.text(max_size=200), st.text(alphabet="ab ¿ñ😀", min_size=1000, max_size=6000),
                   st.just("palabra " * 2000), _JSON)
_ITEMS = st.one_of(st.fixed_dictionaries({"recipient_id": st.just(SENDER), "text": _TEXTS},
                                         optional={"image": _TEXTS, "custom": _JSON}), _JSON)
_ANSWERS = st.one_of(st.lists(_ITEMS, max_size=40), _JSON)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=_ANSWERS, max_replies=st.integers(1, 12), max_segments=st.integers(1, 40))
def test_any_engine_answer_is_capped_and_queued_whole_or_not_at_all(
        redis: redis_lib.Redis, bot: Bot, payload: Any, max_replies: int, max_segments: int) -> None:
    """Whatever an engine answers, what is queued keeps the bot's caps, and the step that queues it
    leaves the conversation consistent: the message finished, every queued reply with its record,
    and one log record."""
    from worker.conversation import _replies
    from worker.engine import EngineError, parse_answers
    from worker.outbound import queue_and_take

    redis.flushdb()
    limited = replace(bot, limits=Limits(max_replies=max_replies, max_segments=max_segments))
    message = INBOUND.load({"sid": "SMhypothesis", "bot_id": bot.id, "sender": SENDER, "to": bot.number, "body": "hi",
                            "received_at": time.time()})
    conversation = keys.conversation_id(bot.id, SENDER)
    raw = json.dumps(message)
    redis.rpush(keys.processing(conversation), raw)
    try:
        answers = parse_answers(payload)
    except EngineError:
        answers = []  # the fallback's business, not the caps'
    replies = _replies(conversation, message, answers, limited.limits)

    queued = queue_and_take(redis, conversation, replies, limited, done_inbound=raw,
                            log_record=exchange_record(message, replies, bot.number), lease_token="")

    ids = redis.lrange(keys.outbox(conversation), 0, -1)
    assert len(replies) <= max_replies
    assert sum(count_segments(reply["text"]) for reply in replies if reply["text"]) <= max_segments
    assert ([reply["id"] for reply in replies], 0, 1) == (ids, redis.llen(keys.processing(conversation)),
                                                          redis.llen(keys.LOG_OUTBOX))
    assert all(redis.hexists(keys.replies(conversation), reply_id) for reply_id in ids)
    assert (queued.head is None) == (not replies)
