"""Log rows, dead letters and scheduled messages done with, older than LOG_RETENTION_DAYS, are purged in
batches, by one worker at a time."""

from __future__ import annotations

import time

import redis as redis_lib
from sqlalchemy import event, func, insert, select

from shared import db, keys
from shared.retention import DAY_SECONDS, purge
from shared.schema import conversations, dead_letters, deliveries, messages, opt_outs, scheduled
from shared.settings import Settings
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
        connection.execute(insert(scheduled), [
            {"id": f"{tag}{n}", "bot_id": 1, "person": "+15550001111", "text": "hi", "origin": "operator",
             "reason": "send-at", "send_at": at, "state": "queued", "created_at": at, "done_at": at}
            for n in range(count)])
        connection.execute(insert(opt_outs), [
            {"bot_number": "+15005550006", "person": f"+1555{tag}{n:04d}", "opted_out": True, "how": "keyword STOP",
             "at": at} for n in range(count)])


def _count(engine: db.Engine, table: db.Table) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def test_rows_older_than_the_retention_period_are_deleted_and_newer_ones_kept(settings: Settings) -> None:
    """Given 91- and 89-day-old rows, a 90-day purge leaves only the 89-day-old ones, and every opt-out."""
    engine = db.get_engine(settings)
    _seed(engine, 7, OLD, "o")
    _seed(engine, 3, RECENT, "r")

    with engine.begin() as connection:  # an old scheduled message still waiting is not done with: kept
        connection.execute(insert(scheduled).values(
            id="w", bot_id=1, person="+15550001111", text="hi", origin="operator", reason="send-at", send_at=OLD,
            state="waiting", created_at=OLD, done_at=None))

    purged = purge(engine, days=90, now=NOW)

    assert {"messages": 7, "deliveries": 7, "conversations": 7, "dead_letters": 7, "scheduled": 7} == purged.rows
    assert [3, 3, 3, 3, 4, 10] == [_count(engine, table) for table in
                                   (messages, deliveries, conversations, dead_letters, scheduled, opt_outs)]


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
