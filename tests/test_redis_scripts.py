"""Lua scripts run over pooled connections directly (shared.redis.Script): what redis-py's layers
did for them still holds against a real Redis."""

from __future__ import annotations

import socket
import time

import pytest
import redis as redis_lib

from shared.redis import Script, connect, script

COUNT_AND_ECHO = "redis.call('INCR', KEYS[1]) return ARGV[1]"
KEY = "test:scripts:runs"


@pytest.fixture
def client(redis_url: str, redis: redis_lib.Redis) -> redis_lib.Redis:
    return connect(redis_url)


def runs(redis: redis_lib.Redis) -> int:
    return int(redis.get(KEY) or 0)


def test_a_script_runs_by_its_sha_and_answers_decoded(client: redis_lib.Redis, redis: redis_lib.Redis) -> None:
    counted = script(client, COUNT_AND_ECHO)
    assert ["é", "b"] == [counted(keys=[KEY], args=["é"]), counted(keys=[KEY], args=[b"b"])]
    assert 2 == runs(redis)
    assert [True] == redis.script_exists(counted.sha)
    assert counted is script(client, COUNT_AND_ECHO)


def test_a_script_redis_lost_is_sent_again_and_cached_again(client: redis_lib.Redis, redis: redis_lib.Redis) -> None:
    """After a restart or SCRIPT FLUSH: the call succeeds, once, and the next goes by SHA again."""
    counted = Script(client, COUNT_AND_ECHO)
    counted(keys=[KEY], args=["x"])
    redis.script_flush()
    assert "y" == counted(keys=[KEY], args=["y"])
    assert (2, [True]) == (runs(redis), redis.script_exists(counted.sha))


def test_a_connection_redis_closed_in_the_pool_is_replaced(client: redis_lib.Redis, redis: redis_lib.Redis) -> None:
    """CLIENT KILL (or a Redis timeout) ends the pooled connection: the next call uses a new one."""
    counted = Script(client, COUNT_AND_ECHO)
    counted(keys=[KEY], args=["x"])
    killed = redis.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    assert "z" == counted(keys=[KEY], args=["z"])
    assert 2 == runs(redis)


def test_a_connection_failing_as_the_script_is_sent_is_replaced_once(
        client: redis_lib.Redis, redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that dies between the pool's check and the send (Redis restarting, say): the
    script is sent again on a new connection, as redis-py's retry did."""
    counted = Script(client, COUNT_AND_ECHO)
    counted(keys=[KEY], args=["x"])
    pool = client.connection_pool
    handed_out = pool.get_connection

    def dying(*args: object, **kwargs: object) -> object:
        connection = handed_out(*args, **kwargs)
        connection._sock.shutdown(socket.SHUT_RDWR)
        return connection

    monkeypatch.setattr(pool, "get_connection", dying)
    assert "z" == counted(keys=[KEY], args=["z"])
    assert 2 == runs(redis)


def test_a_script_error_reaches_the_caller_and_the_connection_goes_on(client: redis_lib.Redis) -> None:
    broken = Script(client, "return redis.call('NOSUCHCOMMAND')")
    with pytest.raises(redis_lib.ResponseError):
        broken()
    identity = client.connection_pool.get_connection()
    before = id(identity._sock)
    client.connection_pool.release(identity)
    with pytest.raises(redis_lib.ResponseError):
        broken()
    identity = client.connection_pool.get_connection()
    assert before == id(identity._sock)  # the same socket: an error reply leaves nothing unread
    client.connection_pool.release(identity)


def test_a_timeout_is_not_retried_and_its_late_answer_never_read(redis_url: str, redis: redis_lib.Redis) -> None:
    """The script ran: it is not run again. Its answer, arriving late, is never taken for the next call's."""
    impatient = redis_lib.Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.2)
    slow = Script(impatient, "redis.call('INCR', KEYS[1]) local t = redis.call('TIME') "
                             "local stop = t[1] * 1000000 + t[2] + 500000 "
                             "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop return 'late'")
    redis.script_load(slow.source)  # cached, so the call below is one EVALSHA
    attempts = []
    run = slow._run
    slow._run = lambda *args: attempts.append(1) or run(*args)  # type: ignore[method-assign]
    with pytest.raises(redis_lib.TimeoutError):
        slow(keys=[KEY])
    assert 1 == len(attempts)
    time.sleep(0.6)  # Redis finishes the script and writes its answer
    assert "fresh" == Script(impatient, "return 'fresh'")()
    assert 1 == runs(redis)


def test_a_script_that_fails_is_run_once(client: redis_lib.Redis, redis: redis_lib.Redis) -> None:
    """Only a missing script is sent again: one that ran and failed must not repeat its writes."""
    failing = Script(client, "redis.call('INCR', KEYS[1]) return redis.error_reply('boom')")
    redis.script_load(failing.source)  # cached: the call is one EVALSHA, and its error is the script's own
    with pytest.raises(redis_lib.ResponseError, match="boom"):
        failing(keys=[KEY])
    assert 1 == runs(redis)
