"""A dyno's shutdown, taken as one: Heroku sends SIGTERM to every process of the dyno, and
Dramatiq's main process forwards the one it gets to each worker process as well. Dramatiq reads
a worker process's second SIGTERM as "kill now", so without this every worker process would
exit at once, dropping its messages in flight, instead of finishing them within
--worker-shutdown-timeout. A further SIGTERM well after the first still kills at once.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

# SIGTERMs closer than this to the first one are the same shutdown, whoever sent them.
SAME_SHUTDOWN_SECONDS = 5.0
# The handler Dramatiq's CLI installs in each worker process (dramatiq.cli.worker_process).
_DRAMATIQ_HANDLER = "worker_process.<locals>.termhandler"


def take_repeated_sigterm_as_one(window: float = SAME_SHUTDOWN_SECONDS) -> bool:
    """Wrap Dramatiq's SIGTERM handler so that repeats within `window` of the first are ignored.

    Only inside a Dramatiq worker process (a test or a shell importing worker.app keeps its own
    handler); returns whether the wrapper was installed. Must run in the process's main thread,
    which is where Dramatiq imports the broker module.
    """
    dramatiqs = signal.getsignal(signal.SIGTERM)
    if not callable(dramatiqs) or getattr(dramatiqs, "__qualname__", "") != _DRAMATIQ_HANDLER:
        return False
    first: list[float] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if first and now - first[0] < window:
            return  # the same shutdown, signalled by Heroku and by Dramatiq's main process
        first[:] = [now]
        dramatiqs(signum, frame)

    signal.signal(signal.SIGTERM, handle)
    return True
