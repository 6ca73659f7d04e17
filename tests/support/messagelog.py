"""Waiting for the message log: workers hand it records through Redis (worker.logdrain)."""

from __future__ import annotations

import time

import redis as redis_lib
from sqlalchemy import Engine

from shared import keys
from worker.logdrain import drain


def log_written(redis: redis_lib.Redis, engine: Engine, timeout: float = 10.0) -> None:
    """Return once every log record handed over so far is in the database: written by a running
    worker's drain, or here when no worker is draining."""
    deadline = time.monotonic() + timeout
    while redis.llen(keys.LOG_OUTBOX):
        if not redis.exists(keys.LOG_DRAIN_LOCK):
            drain(redis, engine)
            continue
        if time.monotonic() > deadline:
            raise AssertionError(f"the message log was not written within {timeout} s")
        time.sleep(0.02)
