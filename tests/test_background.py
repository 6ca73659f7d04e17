"""A process's background threads (shared.background.Periodic) while what they need is away:
a failing turn is logged with its traceback once, not once a second for as long as Redis is down."""

from __future__ import annotations

import threading

import pytest
import redis as redis_lib
from structlog.testing import capture_logs

from shared import background
from shared.background import Periodic


class Flaky(Periodic):
    """Fails with each error of `errors` in turn (None: a turn that works), then stops itself."""

    name = "flaky"
    first_pause = pause_after_failure = 0.001

    def __init__(self, errors: list[Exception | None]) -> None:
        super().__init__()
        self.errors = errors
        self.done = threading.Event()

    def turn(self) -> float:
        if not self.errors:
            self.done.set()
            self._stop.set()
            return 0.001
        error = self.errors.pop(0)
        if error is not None:
            raise error
        return 0.001


def run(errors: list[Exception | None]) -> list[dict[str, object]]:
    with capture_logs() as logs:
        flaky = Flaky(errors).start()
        assert flaky.done.wait(10)
        flaky.stop()
    return [{k: v for k, v in event.items() if k in ("event", "failures", "exc_info")} for event in logs]


def down() -> redis_lib.ConnectionError:
    return redis_lib.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_a_failure_that_repeats_logs_its_traceback_once_and_then_its_recovery() -> None:
    """Fifty failed turns (Redis down for fifty seconds) are one warning with the traceback, then one
    line when a turn works again, saying how many failed."""
    assert [{"event": "flaky.failed", "exc_info": True, "failures": 1}, {"event": "flaky.recovered", "failures": 50}] \
        == run([down() for _ in range(50)] + [None])


def test_a_different_failure_is_logged_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis back, and the database failing instead (or a bug): its own traceback is logged too."""
    assert ["flaky.failed", "flaky.failed", "flaky.recovered"] == [
        event["event"] for event in run([down(), down(), KeyError("bug"), None])]


def test_a_long_failure_says_so_now_and_then(monkeypatch: pytest.MonkeyPatch) -> None:
    """While it lasts, one line per REPEAT_LOG_SECONDS keeps the outage visible in the log."""
    monkeypatch.setattr(background, "REPEAT_LOG_SECONDS", 0.0)
    events = [event["event"] for event in run([down() for _ in range(4)] + [None])]
    assert ["flaky.failed", "flaky.still_failing", "flaky.still_failing", "flaky.still_failing",
            "flaky.recovered"] == events


def test_a_turn_that_works_logs_nothing() -> None:
    assert [] == run([None, None, None])


class Clock:
    """time.monotonic for shared.background, ten seconds further on every time it is read."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        self.now += 10.0
        return self.now


def test_an_outage_is_told_every_30_seconds_counted_from_its_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten failed turns ten seconds apart, the error changing kind at the third: each kind's first
    whole, then a line 30 s after the last one told (not on every turn once 30 s have passed), and
    the recovery says how long the outage lasted, from its first failure whatever kinds followed."""
    clock = Clock()
    monkeypatch.setattr(background, "time", clock)
    errors: list[Exception | None] = [down(), down(), TimeoutError("slow"), *[TimeoutError("slow")] * 7, None]
    with capture_logs() as logs:
        flaky = Flaky(errors).start()
        assert flaky.done.wait(10)
        flaky.stop()
    told = [(event["event"], event.get("failures"), event.get("seconds")) for event in logs]
    assert [("flaky.failed", 1, None), ("flaky.failed", 3, None), ("flaky.still_failing", 6, 50),
            ("flaky.still_failing", 9, 80), ("flaky.recovered", 10, 100.0)] == told
