"""Log rows, dead letters, ended handoffs and refused log records older than LOG_RETENTION_DAYS are
purged in batches, by one worker at a time."""

from __future__ import annotations

import time

import dramatiq
import pytest
import redis as redis_lib
from sqlalchemy import event, func, insert, select

from shared import db, keys
from shared.retention import DAY_SECONDS, purge
from shared.schema import conversations, dead_letters, deliveries, handoffs, messages, opt_outs
from shared.settings import Settings, get_settings
from worker import retention as worker_retention
from worker.logdrain import exchange_record, outcome_record
from worker.retention import run_once

NOW = time.time()
OLD, RECENT = NOW - 91 * DAY_SECONDS, NOW - 89 * DAY_SECONDS


def _seed(engine: db.Engine, count: int, at: float, tag: str) -> None:
    with engine.begin() as connection:
        connection.execute(insert(messages), [
            {"id": f"{tag}{n}", "bot_id": 1, "person": f"+1555000{n:04d}", "bot_number": "+15005550006",
             "direction": "out", "origin": "engine", "text": "hi", "media": [], "sid": f"SM{tag}{n}",
             "status": "queued", "at": at, "updated_at": at} for n in range(count)])
        connection.execute(insert(deliveries), [
            {"sid": f"SM{tag}{n}", "bot_id": 1, "status": "delivered", "rank": 4, "updated_at": at}
            for n in range(count)])
        connection.execute(insert(conversations), [
            {"bot_id": 1, "person": f"+1555{tag}{n:04d}", "last_message_id": f"{tag}{n}", "last_at": at}
            for n in range(count)])
        connection.execute(insert(dead_letters), [
            {"id": f"{tag}{n}", "bot_id": 1, "person": "+15550001111", "text": "hi", "reason": "permanent",
             "attempts": 1, "failed_at": at} for n in range(count)])
        connection.execute(insert(handoffs), [
            {"bot_id": 1, "person": f"+1555{tag}{n:04d}", "since": at - 60, "until": at, "by": "operator",
             "note": "private"} for n in range(count)])
        connection.execute(insert(opt_outs), [
            {"bot_number": "+15005550006", "person": f"+1555{tag}{n:04d}", "opted_out": True, "how": "keyword STOP",
             "at": at} for n in range(count)])


def _count(engine: db.Engine, table: db.Table) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def test_rows_older_than_the_retention_period_are_deleted_and_newer_ones_kept(settings: Settings) -> None:
    """Given 91- and 89-day-old rows, a 90-day purge leaves only the 89-day-old ones, every opt-out,
    and a handoff paused 91 days ago until resumed (still in force)."""
    engine = db.get_engine(settings)
    _seed(engine, 7, OLD, "o")
    _seed(engine, 3, RECENT, "r")
    with engine.begin() as connection:
        connection.execute(insert(handoffs).values(bot_id=2, person="+15559990000", since=OLD, until=None,
                                                   by="operator", note="until resumed"))

    purged = purge(engine, days=90, now=NOW)

    assert {"messages": 7, "deliveries": 7, "conversations": 7, "dead_letters": 7, "handoffs": 7} == purged.rows
    assert [3, 3, 3, 3, 4, 10] == [_count(engine, table) for table in
                                   (messages, deliveries, conversations, dead_letters, handoffs, opt_outs)]


def test_a_purge_works_in_batches_of_short_transactions(settings: Settings) -> None:
    """No transaction deletes more than the batch size, so the tables are never locked for long."""
    engine = db.get_engine(settings)
    _seed(engine, 10, OLD, "o")
    commits: list[int] = []

    def count_commit(connection: object) -> None:
        commits.append(1)

    event.listen(engine, "commit", count_commit)
    try:
        purged = purge(engine, days=90, now=NOW, batch=3)
    finally:
        event.remove(engine, "commit", count_commit)

    assert 50 == purged.total
    assert 5 * 4 == purged.batches  # 3+3+3+1 rows per table, five tables
    assert len(commits) >= purged.batches


def test_only_one_worker_purges_at_a_time(settings: Settings, redis: redis_lib.Redis) -> None:
    """While one process holds the retention lease, another's pass does nothing; the lease is freed after."""
    engine = db.get_engine(settings)
    redis.set(keys.RETENTION_LOCK, "another-worker")

    assert not run_once(redis, engine, days=90)

    redis.delete(keys.RETENTION_LOCK)
    assert run_once(redis, engine, days=90)
    assert not redis.exists(keys.RETENTION_LOCK)


def test_a_running_worker_purges_by_log_retention_days(
        broker: dramatiq.Broker, settings: Settings, redis: redis_lib.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """LOG_RETENTION_DAYS=10 reaches the worker's own retention job: its first pass deletes the 11-day-old
    rows and keeps the 9-day-old ones."""
    # Given rows 11 and 9 days old, and a worker started with LOG_RETENTION_DAYS=10
    engine = db.get_engine(settings)
    _seed(engine, 2, NOW - 11 * DAY_SECONDS, "o")
    _seed(engine, 3, NOW - 9 * DAY_SECONDS, "r")
    monkeypatch.setattr(worker_retention, "FIRST_PASS_SECONDS", 0.2)
    monkeypatch.setenv("LOG_RETENTION_DAYS", "10")
    get_settings.cache_clear()
    running = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    running.start()
    try:
        # When its first pass runs, then only the rows older than 10 days are gone
        deadline = time.monotonic() + 15
        while _count(engine, messages) != 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        running.stop()
        monkeypatch.undo()  # before the settings are read again
        get_settings.cache_clear()
    assert [3, 3, 3, 3] == [_count(engine, table) for table in (messages, deliveries, conversations, dead_letters)]


def test_records_the_database_refused_are_forgotten_after_the_retention_period(
        settings: Settings, redis: redis_lib.Redis) -> None:
    """sms:log:refused holds texts and numbers: a retention pass drops those older than the period."""
    old = exchange_record({"sid": "SMold", "bot_id": 1, "sender": "+15550001111", "to": "+15005550006",
                           "body": "old", "media": [], "received_at": OLD}, [], "+15005550006")
    recent = exchange_record({"sid": "SMnew", "bot_id": 1, "sender": "+15550001111", "to": "+15005550006",
                              "body": "recent", "media": [], "received_at": RECENT}, [], "+15005550006")
    redis.rpush(keys.LOG_REFUSED, old, outcome_record("r-0", "failed", at=OLD), recent)

    assert run_once(redis, db.get_engine(settings), days=90)

    assert [recent] == redis.lrange(keys.LOG_REFUSED, 0, -1)
