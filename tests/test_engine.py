"""The conversation engines: which one a bot gets, the Rasa REST protocol, retries and the fallback."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import redis as redis_lib

from shared import keys, metrics
from shared.bots import Bot
from shared.conversations import INBOUND
from shared.settings import Settings
from tests.support.fake_engine import FAIL_4XX, FAIL_5XX, FAIL_HANG, FAIL_INVALID_JSON, FakeEngine
from worker.engine import Answer, EchoEngine, HttpEngine, engine_for

SENDER = "+15551230001"


def inbound(bot: Bot, body: str = "hola", **extra: Any) -> dict[str, Any]:
    return INBOUND.load({
        "sid": "SM" + "1" * 32, "bot_id": bot.id, "sender": SENDER, "to": bot.number, "body": body,
        "received_at": time.time(), **extra,
    })


def quick(url: str, **options: Any) -> HttpEngine:
    """An HTTP engine with short timeouts and backoff, so failure tests take a second, not fifteen."""
    defaults: dict[str, Any] = {"deadline": 3.0, "read_timeout": 0.5, "backoff": (0.05, 0.05, 0.05)}
    return HttpEngine(url, **{**defaults, **options})


def test_engine_for_prefers_the_bots_url_then_the_services_then_echo(bot: Bot, settings: Settings,
                                                                      redis: redis_lib.Redis) -> None:
    """A bot's engine-url wins over ENGINE_URL, and with neither the echo engine answers."""
    own = dataclasses.replace(bot, engine_url="http://bot.example/webhook")
    service = settings.with_overrides(engine_url="http://service.example/webhook")

    chosen = engine_for(own, service), engine_for(bot, service), engine_for(bot, settings)

    assert isinstance(chosen[0], HttpEngine) and chosen[0].url == "http://bot.example/webhook"
    assert isinstance(chosen[1], HttpEngine) and chosen[1].url == "http://service.example/webhook"
    assert isinstance(chosen[2], EchoEngine)


def test_echo_engine_answers_echo_of_the_text(bot: Bot) -> None:
    """With no engine configured the service still answers: `echo: <text>`."""
    assert [Answer(text="echo: hola")] == EchoEngine().answer(bot, inbound(bot))


def test_http_engine_posts_the_rasa_rest_channel_payload(bot: Bot, engine: FakeEngine, redis: redis_lib.Redis) -> None:
    """The request body is Rasa's REST channel JSON, with our details under metadata."""
    message = inbound(bot, "¿Cómo estás?", event="opt_out",
                      media=[{"url": "https://api.twilio.com/m/1", "content_type": "image/jpeg"}])

    quick(engine.url).answer(bot, message)

    expected = {
        "sender": SENDER,
        "message": "¿Cómo estás?",
        "metadata": {
            "bot_id": bot.id, "to": bot.number, "message_sid": message["sid"], "message_sids": [message["sid"]],
            "media": [{"url": "https://api.twilio.com/m/1", "content_type": "image/jpeg"}], "event": "opt_out",
        },
    }
    assert [expected] == [call.payload for call in engine.calls]


def test_http_engine_returns_every_reply_in_the_order_given(bot: Bot, engine: FakeEngine,
                                                            redis: redis_lib.Redis) -> None:
    """Zero or more {recipient_id, text, image} items become answers in order; empty items are skipped."""
    engine.answer = lambda payload: [
        {"recipient_id": SENDER, "text": "one"},
        {"recipient_id": SENDER, "image": "https://img.example/2.png"},
        {"recipient_id": SENDER, "text": "three", "image": "https://img.example/3.png"},
        {"recipient_id": SENDER, "buttons": []},
    ]

    answers = quick(engine.url).answer(bot, inbound(bot))

    expected = [Answer("one"), Answer(None, "https://img.example/2.png"),
                Answer("three", "https://img.example/3.png")]
    assert expected == answers


@pytest.mark.parametrize("failure", [FAIL_5XX, FAIL_HANG, FAIL_INVALID_JSON])
def test_http_engine_retries_each_kind_of_engine_error(failure: str, bot: Bot, engine: FakeEngine,
                                                       redis: redis_lib.Redis) -> None:
    """5xx, timeouts and invalid JSON are retried, and the engine's eventual answer is used."""
    engine.fail_next(2, failure)

    answers = quick(engine.url).answer(bot, inbound(bot))

    assert [Answer("reply to hola")] == answers
    assert 3 == len(engine.calls)


def test_http_engine_sends_the_fallback_message_when_retries_are_exhausted(bot: Bot, engine: FakeEngine,
                                                                           redis: redis_lib.Redis) -> None:
    """An engine that keeps failing gets the bot's fallback-message as the answer."""
    engine.down()
    with_fallback = dataclasses.replace(bot, fallback_message="Estamos con problemas, intenta luego.")

    answers = quick(engine.url).answer(with_fallback, inbound(bot))

    assert [Answer("Estamos con problemas, intenta luego.")] == answers
    assert 4 == len(engine.calls)  # the first try and one retry per backoff step


def test_http_engine_without_a_fallback_answers_nothing_when_retries_are_exhausted(
        bot: Bot, engine: FakeEngine, redis: redis_lib.Redis) -> None:
    """No fallback-message: the conversation simply moves on."""
    engine.down()

    assert [] == quick(engine.url).answer(bot, inbound(bot))


def test_http_engine_gives_up_within_its_deadline(bot: Bot, engine: FakeEngine, redis: redis_lib.Redis) -> None:
    """A hanging engine holds a message back no longer than the deadline, however many retries remain."""
    # Given an engine that never answers and a 1.5 s deadline with room for many retries
    engine.down(FAIL_HANG)
    slow = quick(engine.url, deadline=1.5, read_timeout=10.0, backoff=(0.05,) * 10)

    # When it is asked
    started = time.monotonic()
    answers = slow.answer(bot, inbound(bot))

    # Then it gives up at the deadline (plus the connection's own slack), not after 10 s reads
    assert [] == answers
    assert time.monotonic() - started < 3.0


def test_http_engine_does_not_retry_a_refused_request(bot: Bot, engine: FakeEngine, redis: redis_lib.Redis) -> None:
    """A 4xx (a wrong URL, say) would be refused again: one call, then the fallback."""
    engine.down(FAIL_4XX)

    answers = quick(engine.url).answer(dataclasses.replace(bot, fallback_message="sorry"), inbound(bot))

    assert [Answer("sorry")] == answers
    assert 1 == len(engine.calls)


def test_engine_calls_are_counted_and_timed_in_metrics(bot: Bot, engine: FakeEngine, redis: redis_lib.Redis) -> None:
    """Each call is counted by outcome and its latency observed, for /metrics."""
    engine.fail_next(1, FAIL_5XX)

    quick(engine.url).answer(bot, inbound(bot))

    metrics.TALLY.flush(redis)  # what the worker's flusher writes every second
    counters = redis.hgetall(keys.METRIC_COUNTERS)
    assert "1" == counters[metrics.field("sms_engine_calls", outcome="http_error")]
    assert "1" == counters[metrics.field("sms_engine_calls", outcome="ok")]
    assert "2" == redis.hget(keys.METRIC_HISTOGRAMS, metrics.field("sms_engine_latency_seconds", le="0.05"))
