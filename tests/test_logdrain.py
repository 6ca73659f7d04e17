"""The message log's records travel through Redis to the database: nothing lost while it is down, nothing held up by one bad record."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis as redis_lib
from sqlalchemy import Engine, select

from shared import db, keys
from shared.schema import messages
from shared.settings import Settings
from worker.logdrain import FENCED, STANDBY_POLL_SECONDS, LogDrain, drain, drain_once, exchange_record, outcome_record

BOT_NUMBER, PERSON = "+15005550006", "+15551230000"


@pytest.fixture
def sql(settings: Settings) -> Engine:
    return db.get_engine(settings)


def exchange(sid: str, *answers: str) -> str:
    message = {"sid": sid, "bot_id": 1, "sender": PERSON, "to": BOT_NUMBER, "body": "hola", "media": [],
               "received_at": time.time()}
    replies = [{"id": f"{sid}-{n}", "bot_id": 1, "to": PERSON, "text": text, "media_url": None, "in_reply_to": sid,
                "created_at": time.time()} for n, text in enumerate(answers)]
    return exchange_record(message, replies, BOT_NUMBER)


def logged(sql: Engine) -> list[tuple[str, str]]:
    with sql.connect() as connection:
        return [tuple(row) for row in connection.execute(select(messages.c.id, messages.c.status).order_by(messages.c.at))]


def holding_the_lease(redis: redis_lib.Redis) -> str:
    token = uuid.uuid4().hex
    assert redis.set(keys.LOG_DRAIN_LOCK, token, nx=True, px=10_000)
    return token


def test_records_wait_in_redis_while_the_database_is_down_and_are_written_once_it_is_back(
        redis: redis_lib.Redis, sql: Engine) -> None:
    """A database outage delays the log, it does not lose it: the records stay on the list until written."""
    redis.rpush(keys.LOG_OUTBOX, exchange("SM1", "hi"), outcome_record("SM1-0", "queued", sid="SMout1"))
    token = holding_the_lease(redis)
    down = db.make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere", size=1)

    with pytest.raises(Exception):
        drain_once(redis, down, token)
    assert 2 == redis.llen(keys.LOG_OUTBOX)

    assert 2 == drain_once(redis, sql, token)
    assert [("SM1", "received"), ("SM1-0", "queued")] == logged(sql)
    assert 0 == redis.llen(keys.LOG_OUTBOX)


def test_a_record_the_database_refuses_is_set_aside_and_the_others_are_written(
        redis: redis_lib.Redis, sql: Engine) -> None:
    """One malformed record cannot hold up the log: it goes to the refused list, its neighbours to the database."""
    broken = json.dumps({"kind": "exchange", "message": {"sid": "SM2"}, "replies": [], "bot_number": None})
    redis.rpush(keys.LOG_OUTBOX, exchange("SM1", "hi"), broken, exchange("SM3"))

    drain(redis, sql)

    assert [("SM1", "received"), ("SM1-0", "pending"), ("SM3", "received")] == logged(sql)
    assert [broken] == redis.lrange(keys.LOG_REFUSED, 0, -1)
    assert 0 == redis.llen(keys.LOG_OUTBOX)


def test_a_writer_that_lost_its_lease_leaves_the_records_for_the_new_holder(
        redis: redis_lib.Redis, sql: Engine) -> None:
    """After a pause past its lease, a writer's batch stays on the list: written again, harmlessly, by the holder."""
    redis.rpush(keys.LOG_OUTBOX, exchange("SM1", "hi"))
    redis.set(keys.LOG_DRAIN_LOCK, "another-process")

    assert FENCED == drain_once(redis, sql, token="a-paused-process")
    assert 1 == redis.llen(keys.LOG_OUTBOX)

    assert 1 == drain_once(redis, sql, token="another-process")
    assert [("SM1", "received"), ("SM1-0", "pending")] == logged(sql)


def test_writing_a_batch_twice_changes_nothing(redis: redis_lib.Redis, sql: Engine) -> None:
    """A crash between a batch's commit and its removal from the list means it is written again: idempotently."""
    records = [exchange("SM1", "hi"), outcome_record("SM1-0", "queued", sid="SMout1")]
    for _ in range(2):
        redis.rpush(keys.LOG_OUTBOX, *records)
        drain(redis, sql)

    assert [("SM1", "received"), ("SM1-0", "queued")] == logged(sql)


def test_the_writer_asks_for_its_lease_again_as_soon_as_a_batch_is_fenced(redis: redis_lib.Redis, sql: Engine) -> None:
    """A writer whose lease passed on stops writing at the next turn, not when its periodic check comes."""
    # Given a writer that holds the lease, and then loses it to another process
    writer = LogDrain(redis, sql)
    writer.turn()
    redis.set(keys.LOG_DRAIN_LOCK, "another-process")
    redis.rpush(keys.LOG_OUTBOX, exchange("SM1", "hi"))

    # When it takes its turns: the first batch is fenced, the next turn finds the lease taken
    writer.turn()
    assert STANDBY_POLL_SECONDS == writer.turn()

    # Then the records wait for the holder
    assert 1 == redis.llen(keys.LOG_OUTBOX)
