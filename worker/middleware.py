"""Dramatiq middleware: runs this process's sweeper for as long as its worker runs."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.middleware import Middleware
from dramatiq.threading import is_gevent_active

from shared.logging import get_logger
from worker.deps import get_bots, get_engine, get_redis, get_settings
from worker.background import MetricsFlush, flush
from worker.logdrain import LogDrain
from worker.retention import Retention
from worker.scheduler import Scheduler
from worker.sweeper import Sweeper

log = get_logger(__name__)


class SweeperMiddleware(Middleware):
    """Starts the sweeper, the message log's writer and the retention job once the worker is up,
    and stops them before the worker shuts down."""

    def __init__(self) -> None:
        self._sweeper: Sweeper | None = None
        self._log_drain: LogDrain | None = None
        self._retention: Retention | None = None
        self._metrics: MetricsFlush | None = None
        self._scheduler: Scheduler | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._sweeper = Sweeper(get_redis(), broker).start()
        self._log_drain = LogDrain(get_redis(), get_engine()).start()
        self._retention = Retention(get_redis(), get_engine(), get_settings().log_retention_days).start()
        self._metrics = MetricsFlush(get_redis()).start()
        self._scheduler = Scheduler(get_redis(), get_engine(), get_bots().by_id).start()
        # The process harness (and an operator reading the logs) waits for this line.
        log.info("worker.ready", pid=os.getpid(), pool="gevent" if is_gevent_active() else "threads",
                 threads=worker.worker_threads)

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        if self._retention is not None:
            self._retention.stop()
            self._retention = None
        if self._scheduler is not None:
            self._scheduler.stop()
            self._scheduler = None

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """The log's writer last, once the threads are done: what they finished is written now."""
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
            try:
                flush(get_redis())  # the counts of the messages just finished
            except Exception:  # noqa: BLE001 - metrics must not hold up a shutdown
                log.warning("metrics_flush.failed", exc_info=True)
        if self._log_drain is not None:
            self._log_drain.stop()
            self._log_drain = None
