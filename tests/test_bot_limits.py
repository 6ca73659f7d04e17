"""Each bot's own limits: what one answer may send, a daily budget that holds replies back (never
drops them), and no bot answering another bot of this service."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import dramatiq
import pytest
import redis as redis_lib

from cli.twilio_standin import TwilioStandin
from shared import keys, metrics
from shared.bots import Bot, BotCache, BotStore, Limits, number_route
from tests.support.fake_engine import FakeEngine
from tests.test_crash_recovery import SENDER, bodies_to, engine_bot, send  # noqa: F401 (fixture)
from worker import budget
from worker.background import flush
from worker.slots import EngineSlots

__all__ = ["engine_bot"]


def answering(*texts: str) -> Any:
    return lambda payload: [{"recipient_id": payload["sender"], "text": text} for text in texts]


def wait_until(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


class TestPerAnswer:
    def test_a_bots_own_max_replies_and_max_segments_cap_its_answers(
            self, redis: redis_lib.Redis, engine_bot: Bot, store: BotStore,  # noqa: F811
            engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        """max-replies 3: an answer of eight items sends three; max-segments 2 then cuts a long one to two segments."""
        store.update(engine_bot.id, {"max-replies": 3, "max-segments": 2})
        engine.answer = answering(*(f"item {n}" for n in range(8)))
        send(redis, engine_bot, "hola")
        twilio.wait_for(2, timeout=30)
        time.sleep(1.0)  # room for a fourth, were one coming
        assert ["item 0", "item 1"] == bodies_to(twilio, SENDER)  # three items, but two segments in all

    def test_defaults_apply_to_limits_a_bot_never_set_and_are_shown(self, bot: Bot, store: BotStore) -> None:
        shown = store.update(bot.id, {"max-replies": 4}).public()
        assert (4, Limits.max_segments, 10_000, 20, 30, False) == (
            shown["max-replies"], shown["max-segments"], shown["max-messages-per-day"],
            shown["max-replies-per-minute"], shown["push-window-days"], shown["allow-cold-push"])
        assert Limits.max_replies == store.update(bot.id, {"max-replies": None}).limits.max_replies  # null unsets


class TestDailyBudget:
    def test_past_max_messages_per_day_replies_are_held_back_then_released_when_the_limit_is_raised(
            self, redis: redis_lib.Redis, engine_bot: Bot, store: BotStore, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
            twilio: TwilioStandin, worker: dramatiq.Worker, logs: list[dict[str, object]]) -> None:
        """A budget of 2: two people are answered, the third waits (logged, counted), and goes once raised."""
        monkeypatch.setattr(budget, "RECHECK_SECONDS", 1.0)
        bot = store.update(engine_bot.id, {"max-messages-per-day": 2})
        people = [f"+1555123000{n}" for n in range(3)]
        for person in people:
            send(redis, bot, "hola", person)
            time.sleep(0.3)  # in this order
        twilio.wait_for(2, timeout=30)
        wait_until(lambda: any(event["event"] == "outbound.held_back" for event in logs))
        assert [people[0], people[1]] == [message.to for message in twilio.messages]

        # When the operator raises the limit, the held reply goes out (nothing was dropped)
        store.update(bot.id, {"max-messages-per-day": 10})
        twilio.wait_for(3, timeout=30)
        assert people == [message.to for message in twilio.messages]
        wait_until(lambda: 3 == sum(event["event"] == "outbound.sent" for event in logs))
        flush(redis)
        assert int(redis.hget(keys.METRIC_COUNTERS, metrics.field("sms_outbound", result="held_back")) or 0) >= 1
        assert "3" == redis.hget(keys.daily_sends(budget.utc_day()), str(bot.id))

    def test_totals_are_shared_by_processes_and_kept_when_redis_refuses(self, redis: redis_lib.Redis, bot: Bot,
                                                                        store: BotStore) -> None:
        """Another process's sends count against the budget after one flush; a refused flush loses nothing."""
        bot = store.update(bot.id, {"max-messages-per-day": 3})
        elsewhere, here = budget.DailySends(), budget.DailySends()
        for _ in range(2):
            elsewhere.sent(bot.id)
        elsewhere.flush(redis)
        here.sent(bot.id)
        assert not here.exhausted(bot)
        with pytest.raises(redis_lib.ConnectionError):
            here.flush(redis_lib.Redis(port=1, socket_connect_timeout=0.2))
        here.flush(redis)
        assert (True, "3") == (here.exhausted(bot), redis.hget(keys.daily_sends(budget.utc_day()), str(bot.id)))
        assert not here.exhausted(store.update(bot.id, {"max-messages-per-day": 0}))  # 0: no limit


def another_bot(store: BotStore, bot: Bot) -> Bot:
    """A second bot of the same Twilio account, on a number of its own."""
    return store.create({"name": "other", "twilio-account-sid": bot.account_sid,
                         "twilio-auth-token": "0123456789abcdef0123456789abcdef", "main-phone-number": "+15005550099"})


def only_the_person_is_answered(redis: redis_lib.Redis, bot: Bot, other: Bot, engine: FakeEngine,
                                twilio: TwilioStandin, logs: list[dict[str, object]]) -> None:
    """`other` and a person text `bot`: only the person reaches the engine and gets a reply."""
    send(redis, bot, "I am a bot", other.number)
    send(redis, bot, "I am a person", SENDER)
    twilio.wait_for(1, timeout=30)
    time.sleep(1.0)
    assert ([SENDER], ["I am a person"]) == ([m.to for m in twilio.messages], [c.text for c in engine.calls])
    assert any(event["event"] == "conversation.from_bot" for event in logs)


class TestLoops:
    def test_a_bot_never_answers_another_bot_of_this_service(
            self, redis: redis_lib.Redis, engine_bot: Bot, store: BotStore,  # noqa: F811
            engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker,
            logs: list[dict[str, object]]) -> None:
        """A text from a number registered here gets no engine call and no reply; a person's still does."""
        other = another_bot(store, engine_bot)
        only_the_person_is_answered(redis, engine_bot, other, engine, twilio, logs)

    def test_a_bots_number_is_known_from_the_registrys_copy_read_with_the_message(
            self, redis: redis_lib.Redis, engine_bot: Bot, store: BotStore,  # noqa: F811
            engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """The step that takes a text reads the registry's copy of the sender's number: people are
        answered, another bot is not, and the bot cache is not asked about any of them (a lookup of
        three Redis commands per new sender and process, before)."""
        asked: list[str] = []
        is_bot_number = BotCache.is_bot_number
        monkeypatch.setattr(BotCache, "is_bot_number", lambda cache, number: asked.append(number) or is_bot_number(
            cache, number))
        other = another_bot(store, engine_bot)
        assert store.copied(number_route("+15550000000")) is None  # loads the copy, as a service's first lookup does
        people = [f"+1555123{n:04d}" for n in range(3)]
        send(redis, engine_bot, "I am a bot", other.number)
        for person in people:
            send(redis, engine_bot, "I am a person", person)
        twilio.wait_for(3, timeout=30)
        time.sleep(0.5)
        assert (sorted(people), [], 3) == (sorted(m.to for m in twilio.messages), asked, len(engine.calls))

    def test_a_flushed_registry_copy_still_keeps_a_bot_from_answering_another(
            self, redis: redis_lib.Redis, engine_bot: Bot, store: BotStore,  # noqa: F811
            engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker,
            logs: list[dict[str, object]]) -> None:
        """With the registry's copy gone (a flushed Redis), the text's step cannot say: the bot cache
        rebuilds the copy from the database and knows the number."""
        other = another_bot(store, engine_bot)
        redis.delete(keys.REGISTRY)
        only_the_person_is_answered(redis, engine_bot, other, engine, twilio, logs)

    def test_a_person_past_max_replies_per_minute_is_not_answered_until_the_minute_is_over(
            self, redis: redis_lib.Redis, engine_bot: Bot, store: BotStore,  # noqa: F811
            engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker,
            logs: list[dict[str, object]]) -> None:
        """max-replies-per-minute 2 (an auto-responder elsewhere answering every reply): the third and fourth
        texts of the minute reach neither the engine nor Twilio; the log says why."""
        store.update(engine_bot.id, {"max-replies-per-minute": 2})
        for n in range(4):
            send(redis, engine_bot, f"auto {n}")
        wait_until(lambda: 2 == sum(event["event"] == "conversation.rate_limited" for event in logs))
        time.sleep(0.5)
        assert (["auto 0", "auto 1"], ["reply to auto 0", "reply to auto 1"]) == (
            [call.text for call in engine.calls], bodies_to(twilio, SENDER))


class TestEngineSlots:
    def test_a_slow_bot_holds_only_its_own_engine_calls_and_other_bots_are_answered_first(
            self, redis: redis_lib.Redis, engine_bot: Bot, store: BotStore,  # noqa: F811
            engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        """max-concurrent-engine-calls 1, six people at a 1 s engine, four worker threads: the slow engine
        never has two calls at once, another bot's person is answered before any of them, and all six are."""
        slow = store.update(engine_bot.id, {"max-concurrent-engine-calls": 1})
        engine.delay = 1.0
        with FakeEngine() as quick_engine:
            quick = store.create({"name": "quick", "twilio-account-sid": slow.account_sid,
                                  "twilio-auth-token": "0123456789abcdef0123456789abcdef",
                                  "main-phone-number": "+15005550077", "engine-url": quick_engine.url,
                                  "messages-per-second": 50})
            people = [f"+1555124000{n}" for n in range(6)]
            for person in people:
                send(redis, slow, "slow", person)
            time.sleep(0.2)  # every thread has had the chance to pick a slow one up
            send(redis, quick, "quick", "+15551249999")
            twilio.wait_for(7, timeout=30)
        assert "+15551249999" == twilio.messages[0].to
        assert sorted(people) == sorted(message.to for message in twilio.messages[1:])
        assert [1] * 6 == [engine.most_in_flight(person) for person in people]
        assert 1 == max(call_overlap(engine))


    def test_a_bot_that_never_set_the_limit_holds_a_quarter_of_the_workers_threads(
            self, bot: Bot, store: BotStore, monkeypatch: pytest.MonkeyPatch) -> None:
        """WORKER_THREADS=8 and no max-concurrent-engine-calls: two of the bot's calls at once, not a third,
        while another bot still gets its own two."""
        monkeypatch.setenv("WORKER_THREADS", "8")
        monkeypatch.setenv("WEB_THREADS", "1")
        other = store.create({"name": "other", "twilio-account-sid": bot.account_sid,
                              "twilio-auth-token": "0123456789abcdef0123456789abcdef",
                              "main-phone-number": "+15005550078"})
        assert None is bot.limits.max_concurrent_engine_calls
        slots = EngineSlots()
        with ExitStack() as held:
            taken = [held.enter_context(slots.taken(bot)) for _ in range(3)]
            others = [held.enter_context(slots.taken(other)) for _ in range(2)]
        assert ([True, True, False], [True, True]) == (taken, others)

def call_overlap(engine: FakeEngine) -> list[int]:
    """How many calls were in flight at each call's start (each lasts engine.delay)."""
    starts = sorted(call.at for call in engine.calls)
    return [sum(1 for other in starts if other <= start < other + engine.delay - 0.05) for start in starts]


class TestRegistry:
    API = "/app:mammut-1/graph/user"

    def test_limits_are_set_by_json_or_query_string_shown_and_unset_by_null(
            self, client: Any, admin_headers: dict[str, str], bot: Bot) -> None:
        url = f"{self.API}:{bot.id}"
        assert 200 == client.post(url, json={"max-replies": 3, "allow-cold-push": True}, headers=admin_headers).status_code
        assert 200 == client.post(f'{url}?max-messages-per-day="500"&max-replies-per-minute=0',
                                  headers=admin_headers).status_code
        shown = client.get(url, headers=admin_headers).get_json()["data"]["user"][0]
        assert (3, True, 500, 0, Limits.max_segments) == (
            shown["max-replies"], shown["allow-cold-push"], shown["max-messages-per-day"],
            shown["max-replies-per-minute"], shown["max-segments"])
        assert 200 == client.post(url, json={"max-replies": None}, headers=admin_headers).status_code
        assert Limits.max_replies == client.get(url, headers=admin_headers).get_json()["data"]["user"][0]["max-replies"]

    @pytest.mark.parametrize("body", [{"max-replies": 0}, {"max-replies": 101}, {"max-replies": True},
                                      {"max-replies": 2.5}, {"max-replies": "٣"}, {"max-messages-per-day": -1},
                                      {"allow-cold-push": "yes"}, {"max-concurrent-engine-calls": 0}])
    def test_a_bad_limit_is_refused_naming_it(self, client: Any, admin_headers: dict[str, str], bot: Bot,
                                              body: dict[str, Any]) -> None:
        response = client.post(f"{self.API}:{bot.id}", json=body, headers=admin_headers)
        assert 400 == response.status_code
        assert next(iter(body)) in response.get_data(as_text=True)
