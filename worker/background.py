"""Background threads of a worker process (the sweeper, the log's writer, retention, the metrics
flush), each a shared.background.Periodic; the metrics flush is defined here."""

from __future__ import annotations

from typing import Any

from shared.metrics import TALLY, TallyFlush


class MetricsFlush(TallyFlush):
    """Writes the process's metrics tally (shared.metrics.TALLY) and its count of sends per bot
    (worker.budget) to Redis every second."""

    name = "metrics_flush"

    def turn(self) -> float:
        flush(self.redis)
        return self.FLUSH_SECONDS


def flush(redis: Any) -> None:
    """What the process counted in memory, to Redis (also once more at shutdown)."""
    from worker.budget import DAILY_SENDS

    DAILY_SENDS.flush(redis)
    TALLY.flush(redis)
