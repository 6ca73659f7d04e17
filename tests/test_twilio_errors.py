"""Twilio's answers decide what happens to a reply: retried on "later", never on "never"."""

from __future__ import annotations

import time
from types import ModuleType

import dramatiq
import pytest
import redis as redis_lib

from cli.twilio_standin import TwilioStandin
from shared import keys, metrics, optout
from shared.bots import BotStore
from shared.twilio_errors import HINTS, Action, action_for
from tests.support.messagelog import log_written
from tests.test_outbound import ALICE, BOB, bodies_to, log_entry, make_bot, outbox_empty, send, sql, wait_until
from worker import twilio_client
from shared.dlq import list_dead_letters


@pytest.fixture
def outbound(broker: dramatiq.Broker) -> ModuleType:
    """worker.outbound, imported once the test environment (and so its broker) is in place."""
    import worker.outbound

    return worker.outbound


class TestTable:
    """One table maps Twilio's codes and HTTP statuses to an action (../shared/reference/twilio.md)."""

    @pytest.mark.parametrize(("status", "code", "expected"), [
        (429, 20429, Action.RETRY),
        (429, None, Action.RETRY),
        (500, None, Action.RETRY),
        (503, 20500, Action.RETRY),
        (None, None, Action.RETRY),  # timeouts and connection errors
        (400, 21611, Action.RETRY_SLOWLY),
        (400, 30001, Action.RETRY_SLOWLY),
        (400, 21610, Action.OPTED_OUT),
        (401, 20003, Action.PERMANENT),
        (400, 21211, Action.PERMANENT),
        (400, 21408, Action.PERMANENT),
        (400, 21608, Action.PERMANENT),
        (400, 21612, Action.PERMANENT),
        (400, 21614, Action.PERMANENT),
        (400, 21617, Action.PERMANENT),
        (400, 99999, Action.PERMANENT),  # any other 4xx
        (404, None, Action.PERMANENT),
    ])
    def test_each_answer_maps_to_the_issues_action(self, status: int | None, code: int | None, expected: Action) -> None:
        """Every code the issue names gets its action; unknown 4xx are permanent, 5xx and no answer retried."""
        assert expected == action_for(status, code)

    def test_first_retry_comes_within_one_to_two_seconds(self, outbound: ModuleType) -> None:
        """Twilio says a 429 is always safe to retry: the first retry is quick, later ones back off."""
        first = [outbound.backoff(Action.RETRY, 1) for _ in range(200)]
        assert 1.0 <= min(first) and max(first) <= 2.0
        assert 2.0 <= min(outbound.backoff(Action.RETRY, 2) for _ in range(200))

    def test_full_sender_queue_backs_off_slower_and_every_delay_is_capped(self, outbound: ModuleType) -> None:
        """21611/30001 start slower than a 429, and no delay exceeds twice its cap."""
        assert min(outbound.backoff(Action.RETRY_SLOWLY, 1) for _ in range(200)) > 2.0
        for action, (_, cap) in outbound.BACKOFF.items():
            assert outbound.backoff(action, 40) <= 2 * cap


def counter(redis: redis_lib.Redis, **labels: object) -> int:
    metrics.TALLY.flush(redis)  # what the worker's flusher writes every second
    inner = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return int(redis.hget(keys.METRIC_COUNTERS, f"sms_outbound{{{inner}}}") or 0)


def lose_the_next_send(monkeypatch: pytest.MonkeyPatch, outbound: ModuleType) -> None:
    """The worker's next send is lost before it reaches Twilio (no answer, nothing created); later ones go."""
    real_send = outbound.send_sms
    calls: list[str] = []

    def lost_on_the_way(*args: object, **kwargs: object) -> object:
        calls.append("send")
        if len(calls) == 1:
            return twilio_client.Refused(None, None, "ConnectionError: connection reset before the request was sent")
        return real_send(*args, **kwargs)

    monkeypatch.setattr(outbound, "send_sms", lost_on_the_way)


class TestRetried:
    """429, 5xx, timeouts and a full sender queue are retried until Twilio accepts, each sent once."""

    @pytest.mark.parametrize(("status", "code"), [(429, 20429), (500, 20500), (503, 20503)])
    def test_later_answer_is_retried_after_a_short_delay_and_sent_once(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        outbound: ModuleType, status: int, code: int,
    ) -> None:
        """A refused send comes back after the backoff's first delay (>= 1 s) and is accepted once."""
        # Given Twilio refuses the next send
        bot = make_bot(store, "+15550000401")
        twilio.fail_next(1, status=status, code=code)
        # When a reply is sent
        send(redis, bot, ALICE, "retry me")
        # Then it arrives once, on the second attempt, at least the first backoff later
        [message] = twilio.wait_for(1)
        first, second = twilio.attempts
        assert (status, 201) == (first.http_status, second.http_status)
        assert second.received_at - first.received_at >= outbound.BACKOFF[Action.RETRY][0]
        assert ["retry me"] == [m.body for m in twilio.messages]
        assert 1 == counter(redis, result="retried", code=code)

    @pytest.mark.parametrize("code", [21611, 30001])
    def test_full_sender_queue_is_retried(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        monkeypatch: pytest.MonkeyPatch, outbound: ModuleType, code: int,
    ) -> None:
        """21611 and 30001 (Twilio's queue for the number is full) are retried, not dropped."""
        monkeypatch.setitem(outbound.BACKOFF, Action.RETRY_SLOWLY, (0.2, 1.0))  # keep the test short
        bot = make_bot(store, "+15550000402")
        twilio.fail_next(2, status=400, code=code)
        send(redis, bot, ALICE, "queue full")
        twilio.wait_for(1)
        assert [400, 400, 201] == [attempt.http_status for attempt in twilio.attempts]
        assert 2 == counter(redis, result="retried", code=code)

    def test_a_send_whose_answer_timed_out_is_found_at_twilio_and_not_sent_again(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        monkeypatch: pytest.MonkeyPatch, outbound: ModuleType, logs: list[dict[str, object]],
    ) -> None:
        """A send whose answer outlasts the client's read timeout has an unknown outcome: Twilio's message
        list shows it was accepted, so the reply is finished with that SID, sent once, and the next follows."""
        # Given a client that gives up after 0.5 s, and a Twilio that answers the next send after 3 s
        monkeypatch.setattr(twilio_client, "READ_TIMEOUT", 0.5)
        monkeypatch.setattr(outbound, "NO_CALLBACK_GRACE_SECONDS", 0.5)
        monkeypatch.setattr(outbound, "RECONCILE_RECHECK_SECONDS", 0.5)
        twilio.fail_with_delay(3.0)
        bot = make_bot(store, "+15550000403", rate=50)
        # When two replies are sent
        send(redis, bot, ALICE, "slow", "next")
        # Then the first is not posted again: the list lookup finds it; the second follows it
        twilio.wait_for(2)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        time.sleep(0.5)
        assert ["slow", "next"] == bodies_to(twilio.messages, ALICE)
        assert ["lookup-found"] == [event["how"] for event in logs if event["event"] == "outbound.reconciled"]
        assert 0 == counter(redis, result="retried", code="none")

    def test_a_send_lost_before_it_reached_twilio_is_sent_again_once_the_list_says_it_is_not_there(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        monkeypatch: pytest.MonkeyPatch, outbound: ModuleType, logs: list[dict[str, object]],
    ) -> None:
        """A connection refused by a proxy (no HTTP status, nothing created): after the list lookup finds
        nothing, the reply is sent again, once."""
        monkeypatch.setattr(outbound, "NO_CALLBACK_GRACE_SECONDS", 0.5)
        monkeypatch.setattr(outbound, "RECONCILE_RECHECK_SECONDS", 0.5)
        lose_the_next_send(monkeypatch, outbound)
        bot = make_bot(store, "+15550000404", rate=50)
        send(redis, bot, ALICE, "lost")
        twilio.wait_for(1)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        assert (["lost"], ["lookup-absent-resent"]) == (
            bodies_to(twilio.messages, ALICE),
            [event["how"] for event in logs if event["event"] == "outbound.reconciled"])

    def test_an_unknown_send_is_not_settled_by_another_reply_of_the_log_with_the_same_text(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        monkeypatch: pytest.MonkeyPatch, outbound: ModuleType, logs: list[dict[str, object]],
    ) -> None:
        """The person already got "ok" from an earlier reply the log owns; a second "ok" lost before it reached
        Twilio finds only that earlier message in the list, so it is sent again, not taken as sent."""
        # Given an earlier reply "ok", sent and in the log
        monkeypatch.setattr(outbound, "NO_CALLBACK_GRACE_SECONDS", 0.5)
        monkeypatch.setattr(outbound, "RECONCILE_RECHECK_SECONDS", 0.5)
        bot = make_bot(store, "+15550000405", rate=50)
        send(redis, bot, ALICE, "ok")
        twilio.wait_for(1)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        log_written(redis, sql())
        # When the next "ok" is lost on its way (no answer, nothing created)
        lose_the_next_send(monkeypatch, outbound)
        [second] = send(redis, bot, ALICE, "ok")
        # Then the list lookup leaves the earlier message to its reply, and this one goes out too
        twilio.wait_for(2)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        assert (["ok", "ok"], ["lookup-absent-resent"]) == (
            bodies_to(twilio.messages, ALICE),
            [event["how"] for event in logs if event["event"] == "outbound.reconciled"])
        assert twilio.messages[1].sid == log_entry(redis, bot, ALICE, second)["sid"]

    def test_a_send_settled_by_the_list_lookup_counts_toward_the_daily_budget(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        monkeypatch: pytest.MonkeyPatch, outbound: ModuleType, logs: list[dict[str, object]],
    ) -> None:
        """max-messages-per-day 1: a first reply whose answer was lost and then found at Twilio is the day's
        send, so the next reply is held back."""
        monkeypatch.setattr(twilio_client, "READ_TIMEOUT", 0.5)
        monkeypatch.setattr(outbound, "NO_CALLBACK_GRACE_SECONDS", 0.5)
        monkeypatch.setattr(outbound, "RECONCILE_RECHECK_SECONDS", 0.5)
        twilio.fail_with_delay(3.0)
        bot = make_bot(store, "+15550000406", rate=50, **{"max-messages-per-day": 1})
        send(redis, bot, ALICE, "slow")
        twilio.wait_for(1)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        send(redis, bot, BOB, "over the budget")
        wait_until(lambda: any(event["event"] == "outbound.held_back" for event in logs), what="held back")
        assert (["lookup-found"], ["slow"]) == (
            [event["how"] for event in logs if event["event"] == "outbound.reconciled"],
            [message.body for message in twilio.messages])

    def test_retries_stop_after_the_budget_and_the_reply_is_dead_lettered(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch, outbound: ModuleType,
    ) -> None:
        """A reply Twilio keeps refusing with 5xx is given up once its retry budget is spent."""
        monkeypatch.setattr(outbound, "RETRY_BUDGET_SECONDS", 2.5)
        bot = make_bot(store, "+15550000404")
        twilio.fail_always(to=ALICE, status=500, code=20500)
        [reply_id] = send(redis, bot, ALICE, "never accepted")
        wait_until(lambda: list_dead_letters(redis, broker), timeout=15, what="a dead letter")
        [dead] = list_dead_letters(redis, broker)
        assert (reply_id, "exhausted", 20500) == (dead["reply_id"], dead["reason"], dead["error_code"])
        assert 2 <= len(twilio.attempts)
        assert ("failed", 20500) == tuple(log_entry(redis, bot, ALICE, reply_id)[k] for k in ("status", "error-code"))


class TestNever:
    """Permanent refusals are recorded and dead-lettered; an opted-out recipient is remembered."""

    def test_opted_out_recipient_is_remembered_never_retried_and_later_replies_suppressed(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker,
    ) -> None:
        """21610 marks the person opted out; the reply is not retried or dead-lettered, nor is the next sent."""
        bot = make_bot(store, "+15550000501")
        twilio.fail_next(1, status=400, code=21610, to=ALICE)
        [refused] = send(redis, bot, ALICE, "first")
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        [later] = send(redis, bot, ALICE, "second")
        send(redis, bot, BOB, "to bob")
        twilio.wait_for(1)
        wait_until(outbox_empty(redis, bot, ALICE), what="empty outbox")
        assert optout.is_opted_out(redis, bot.number, ALICE)
        assert [21610] == [attempt.code for attempt in twilio.attempts if attempt.to == ALICE]
        assert ("failed", 21610) == tuple(log_entry(redis, bot, ALICE, refused)[k] for k in ("status", "error-code"))
        assert "suppressed" == log_entry(redis, bot, ALICE, later)["status"]
        assert [] == list_dead_letters(redis, broker)

    @pytest.mark.parametrize(("status", "code"), [(400, 21211), (401, 20003), (400, 21608), (400, 21614)])
    def test_permanent_refusal_is_recorded_dead_lettered_and_the_conversation_moves_on(
        self, redis: redis_lib.Redis, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker,
        broker: dramatiq.Broker, status: int, code: int,
    ) -> None:
        """The refused reply is tried once, logged failed with its code, dead-lettered; the next one goes out."""
        bot = make_bot(store, "+15550000502")
        twilio.fail_next(1, status=status, code=code)
        failed, _ = send(redis, bot, ALICE, "refused", "next one")
        [message] = twilio.wait_for(1)
        wait_until(lambda: list_dead_letters(redis, broker), what="a dead letter")
        assert "next one" == message.body
        assert [code, None] == [attempt.code for attempt in twilio.attempts]
        assert ("failed", code) == tuple(log_entry(redis, bot, ALICE, failed)[k] for k in ("status", "error-code"))
        [dead] = list_dead_letters(redis, broker)
        assert (failed, code, "permanent", "refused") == (dead["reply_id"], dead["error_code"], dead["reason"], dead["text"])
        assert 1 == counter(redis, result="failed", code=code)


class TestHints:
    """Operators get a plain explanation for the refusals they can act on."""

    @pytest.mark.parametrize("code", [20003, 21211, 21408, 21608, 21610, 21611, 21612, 21614, 30001])
    def test_codes_an_operator_can_fix_have_a_hint(self, code: int) -> None:
        """Each code the issue names for sending, bar the transient 20429, explains itself."""
        assert HINTS.get(code)
