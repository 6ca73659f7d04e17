"""One inbound text cannot run up unbounded SMS: an engine's answer is capped in replies and segments."""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import pytest
import redis as redis_lib

from cli.twilio_standin import TwilioStandin
from shared.bots import Bot
from shared.conversations import ELLIPSIS, MAX_REPLIES_PER_ANSWER, MAX_SEGMENTS_PER_ANSWER, capped, new_reply
from shared.segments import count_segments
from tests.support.fake_engine import FakeEngine
from tests.test_crash_recovery import SENDER, bodies_to, engine_bot, send  # noqa: F401 (fixture)

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
