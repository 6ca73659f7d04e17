"""Background threads of a process (a worker's sweeper, log writer and retention, either process's
metrics flush): each repeats one turn until stopped, and a failed turn (Redis or the database away)
is logged, not fatal."""

from __future__ import annotations

import threading
import time

from shared.logging import get_logger

log = get_logger(__name__)

# A turn that keeps failing the same way (Redis away for a minute) logs its traceback once, then a
# line this often while it goes on, and a line when a turn works again: not a traceback a second
# for each of a process's threads.
REPEAT_LOG_SECONDS = 30.0


class Periodic:
    """A daemon thread calling `turn()`, which returns the seconds to pause before the next turn."""

    name = "periodic"
    first_pause = 1.0
    pause_after_failure = 1.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def turn(self) -> float:
        raise NotImplementedError

    def _run(self) -> None:
        pause = self.first_pause
        failures, since, logged_at, kind = 0, 0.0, 0.0, ""
        while not self._stop.wait(pause):
            try:
                pause = self.turn()
            except Exception as error:  # noqa: BLE001 - a blip must not end the job for this process
                now, was = time.monotonic(), kind
                failures, kind = failures + 1, type(error).__qualname__
                if failures == 1:
                    since = now
                if failures == 1 or kind != was:
                    logged_at = now
                    log.warning(f"{self.name}.failed", exc_info=True, failures=failures)
                elif now - logged_at >= REPEAT_LOG_SECONDS:
                    logged_at = now
                    log.warning(f"{self.name}.still_failing", error=f"{kind}: {error}", failures=failures,
                                seconds=round(now - since))
                pause = self.pause_after_failure
            else:
                if failures:
                    log.info(f"{self.name}.recovered", failures=failures, seconds=round(time.monotonic() - since, 1))
                    failures, kind = 0, ""
