"""Merging a burst: a bot's merge-window-ms makes the texts a person sends in quick succession one
turn for the engine, without a worker thread waiting on the window."""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import pytest
import redis as redis_lib
from flask.testing import FlaskClient

from cli.twilio_standin import TwilioStandin
from shared import keys
from shared.bots import Bot, BotStore
from shared.conversations import INBOUND, accept_inbound
from shared.optout import classify
from tests.support.fake_engine import FakeEngine
from tests.support.processes import Process, start_worker
from tests.test_crash_recovery import SENDER, bodies_to, engine_bot, workers  # noqa: F401 (fixtures)

__all__ = ["engine_bot", "workers"]
USERS = "/app:mammut-1/graph/user"


def text(redis: redis_lib.Redis, bot: Bot, body: str, sender: str = SENDER,
         media: list[dict[str, Any]] | None = None) -> str:
    """What the webhook does with an inbound SMS; its MessageSid."""
    sid = f"SM{time.time_ns():032x}"
    assert accept_inbound(redis, INBOUND.load({"sid": sid, "bot_id": bot.id, "sender": sender, "to": bot.number,
                                               "body": body, "media": media or [], "event": classify(body),
                                               "received_at": time.time()}))
    return sid


def merging(store: BotStore, bot: Bot, window_ms: int) -> Bot:
    return store.update(bot.id, {"merge-window-ms": window_ms})


def test_a_burst_reaches_the_engine_as_one_turn_and_the_log_keeps_each_text(
        client: FlaskClient, admin_headers: dict[str, str], engine_bot: Bot, store: BotStore,  # noqa: F811
        redis: redis_lib.Redis, engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
    bot = merging(store, engine_bot, 800)
    picture = {"url": "https://api.twilio.com/media/1", "content_type": "image/png"}
    sids = [text(redis, bot, "hola"), text(redis, bot, "tengo una pregunta"),
            text(redis, bot, "", media=[picture]), text(redis, bot, "¿abren el domingo?")]

    twilio.wait_for(1, timeout=30)
    [call] = engine.calls
    assert ("hola\ntengo una pregunta\n¿abren el domingo?", sids, [picture]) == (
        call.text, call.payload["metadata"]["message_sids"],
        [{"url": m["url"], "content_type": m["content_type"]} for m in call.payload["metadata"]["media"]])
    assert ["reply to hola\ntengo una pregunta\n¿abren el domingo?"] == bodies_to(twilio, SENDER)
    def log_now() -> list[dict[str, Any]]:
        return client.get(f"{USERS}:{bot.id}/messages?with=%2B15551230001", headers=admin_headers).json["data"]["messages"]

    deadline = time.monotonic() + 15
    while len(log_now()) < 5 and time.monotonic() < deadline:  # the log trails the work a little
        time.sleep(0.05)
    log = log_now()
    inbound = [entry for entry in log if entry["direction"] == "in"]
    assert sids == [entry["id"] for entry in inbound]
    assert ["hola", "tengo una pregunta", "", "¿abren el domingo?"] == [entry["text"] for entry in inbound]
    assert "out" == log[-1]["direction"]
    assert 0 == redis.llen(keys.inbox(keys.conversation_id(bot.id, SENDER)))


def test_a_window_of_zero_asks_the_engine_once_per_text_without_waiting(
        engine_bot: Bot, redis: redis_lib.Redis, engine: FakeEngine, twilio: TwilioStandin,  # noqa: F811
        worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any) -> None:
        raise AssertionError("a window of 0 must not look for a burst")

    monkeypatch.setattr("worker.conversation._merged", never)
    for body in ("uno", "dos", "tres"):
        text(redis, engine_bot, body)
    twilio.wait_for(3, timeout=30)
    assert ["uno", "dos", "tres"] == [call.text for call in engine.calls]


def test_a_person_who_keeps_typing_is_answered_after_five_windows_at_most(
        engine_bot: Bot, store: BotStore, redis: redis_lib.Redis, engine: FakeEngine,  # noqa: F811
        twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
    """Texts every half window never let the window close: the cap of 5 windows ends the turn."""
    bot = merging(store, engine_bot, 300)
    sent = []
    stop_at = time.monotonic() + 3.0  # ten windows of texts
    while time.monotonic() < stop_at:
        sent.append(text(redis, bot, f"t{len(sent)}"))
        time.sleep(0.15)
    calls = engine.wait_for_calls(2, timeout=30)
    assert 1 < len(calls[0].payload["metadata"]["message_sids"]) < len(sent)
    # Every text reaches the engine once, in order, across the turns
    engine_sids = [sid for call in engine.wait_for_calls(len(calls)) for sid in call.payload["metadata"]["message_sids"]]
    time.sleep(1.0)
    engine_sids = [sid for call in engine.calls for sid in call.payload["metadata"]["message_sids"]]
    assert sent == engine_sids


def test_a_stop_ends_the_burst(engine_bot: Bot, store: BotStore, redis: redis_lib.Redis,  # noqa: F811
                               engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
    """Only texts merge: a STOP is its own turn, after the texts before it."""
    bot = merging(store, engine_bot, 500)
    text(redis, bot, "hola")
    text(redis, bot, "otra cosa")
    text(redis, bot, "STOP")
    engine.wait_for_calls(2, timeout=30)
    assert [("hola\notra cosa", "message"), ("STOP", "opt_out")] == [
        (call.text, call.payload["metadata"]["event"]) for call in engine.calls]


def test_a_start_at_the_head_of_a_burst_is_its_own_turn(
        engine_bot: Bot, store: BotStore, redis: redis_lib.Redis,  # noqa: F811
        engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
    """START then "hola" within the window: the engine gets an opt-in turn, then a message turn."""
    bot = merging(store, engine_bot, 500)
    text(redis, bot, "START")
    text(redis, bot, "hola")
    engine.wait_for_calls(2, timeout=30)
    time.sleep(0.5)  # room for a third call, were the turns split otherwise
    assert [("START", "opt_in"), ("hola", "message")] == [
        (call.text, call.payload["metadata"]["event"]) for call in engine.calls]


def test_a_merge_window_holds_no_worker_thread(
        engine_bot: Bot, store: BotStore, redis: redis_lib.Redis, engine: FakeEngine,  # noqa: F811
        twilio: TwilioStandin, workers: list[Process], worker_env: dict[str, str]) -> None:
    """One worker thread in all: while one person's 4 s window runs, another person is answered."""
    workers.append(start_worker(worker_env, processes=1, threads=1))
    bot = merging(store, engine_bot, 4000)
    waiting = "+15551230002"
    text(redis, bot, "hola", sender=waiting)
    time.sleep(0.5)  # the one thread has seen the window open
    other = store.create({"name": "other", "twilio-account-sid": bot.account_sid, "twilio-auth-token": "x" * 32,
                          "main-phone-number": "+15005550012", "engine-url": engine.url, "messages-per-second": 50})
    text(redis, other, "urgente", sender=SENDER)

    twilio.wait_for(1, timeout=30)
    assert ["urgente"] == [call.text for call in engine.calls]
    assert [SENDER] == [message.to for message in twilio.messages]
    # and the window's turn still comes
    twilio.wait_for(2, timeout=30)
    assert ["urgente", "hola"] == [call.text for call in engine.calls]
