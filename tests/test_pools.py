"""Redis pools sized to the process: a thread past the pool's size waits for a connection
instead of failing with "Too many connections", in a test process and in a real worker."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import pytest
import redis as redis_lib

from cli.twilio_standin import TwilioStandin
from shared.bots import Bot, BotStore
from shared.conversations import INBOUND, accept_inbound
from shared.redis import POOL_MARGIN, POOL_TIMEOUT_SECONDS, connect
from shared.tasks import make_broker
from tests.support.fake_engine import FakeEngine
from tests.support.processes import Process, start_worker

PEOPLE = 300


def test_hundreds_of_threads_share_one_client_without_too_many_connections(redis_url: str) -> None:
    """300 threads, each holding a connection of one client at once, all finish with no error."""
    # Given one client, as a process has, and more threads than redis-py's default cap of 100
    client = connect(redis_url)
    start = threading.Barrier(PEOPLE)
    errors: list[BaseException] = []

    def hold_a_connection(index: int) -> None:
        start.wait()
        try:
            client.blpop([f"test:pools:nothing:{index}"], timeout=0.2)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    # When they all use it at the same moment
    threads = [threading.Thread(target=hold_a_connection, args=(index,)) for index in range(PEOPLE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    # Then every thread finished, and none was refused a connection
    assert ([], 0) == (errors, sum(thread.is_alive() for thread in threads))
    client.close()


def test_every_client_waits_in_a_pool_sized_to_the_threads_and_keeps_rediss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's and the broker's clients over rediss:// use SSL without checking the certificate, in
    blocking pools of WORKER_THREADS plus the margin."""
    # Given a worker process of 200 threads and a Heroku-style rediss:// URL
    monkeypatch.setenv("WORKER_THREADS", "200")
    url = "rediss://:secret@redis.example.com:6380/0"

    # When the process makes its clients (nothing connects until a command is sent)
    pools = [connect(url).connection_pool, make_broker(url).client.connection_pool]

    # Then each waits up to the timeout for one of 200 + margin SSL connections
    expected = (True, 200 + POOL_MARGIN, POOL_TIMEOUT_SECONDS, redis_lib.SSLConnection, None)
    for pool in pools:
        assert expected == (isinstance(pool, redis_lib.BlockingConnectionPool), pool.max_connections, pool.timeout, pool.connection_class,
                            pool.connection_kwargs["ssl_cert_reqs"])


def test_redis_pool_size_caps_a_process_below_its_threads_for_a_small_redis_plan(
        monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    """REDIS_POOL_SIZE=5 with 1,000 greenlets: pools of 5, and 50 threads sharing them all finish."""
    # Given a gevent-sized worker on a Redis plan that allows few connections
    monkeypatch.setenv("WORKER_THREADS", "1000")
    monkeypatch.setenv("REDIS_POOL_SIZE", "5")
    client = connect(redis_url)
    assert (5, 5) == (client.connection_pool.max_connections, make_broker(redis_url).client.connection_pool.max_connections)

    # When 50 threads use the client at once
    errors: list[BaseException] = []

    def use(index: int) -> None:
        try:
            client.blpop([f"test:pools:small:{index}"], timeout=0.05)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=use, args=(index,)) for index in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    # Then they took turns: none failed, and no more than 5 connections were ever opened
    assert ([], True) == (errors, len(client.connection_pool._connections) <= 5)
    client.close()


@pytest.fixture
def slow_engine() -> Iterator[FakeEngine]:
    with FakeEngine(delay=1.0) as fake:
        yield fake


@pytest.fixture
def slow_bot(bot: Bot, store: BotStore, slow_engine: FakeEngine) -> Bot:
    # Pacing is per number: 300 replies from one number would otherwise take 300 s.
    return store.update(bot.id, {"engine-url": slow_engine.url, "messages-per-second": 200})


@pytest.fixture(params=[("threads", 150), ("gevent", 400)], ids=["threads", "gevent"])
def worker_process(request: pytest.FixtureRequest, worker_env: dict[str, str], redis: redis_lib.Redis,
                   twilio: TwilioStandin) -> Iterator[Process]:
    """The Procfile's worker, one process above redis-py's default pool cap: 150 threads, or 400 greenlets."""
    pool, threads = request.param
    twilio.reset()
    with start_worker({**worker_env, "WORKER_POOL": pool}, processes=1, threads=threads) as worker:
        assert re.search(rf"\bpool\W{{1,4}}{pool}\b", worker.log), worker.log[-2000:]  # it runs the pool asked for
        yield worker


def send(redis: redis_lib.Redis, bot: Bot, body: str, sender: str) -> None:
    """What the webhook does with an inbound SMS: store it, which wakes a worker."""
    message = INBOUND.load({"sid": f"SM{time.time_ns():032x}", "bot_id": bot.id, "sender": sender, "to": bot.number,
                            "body": body, "received_at": time.time()})
    assert accept_inbound(redis, message)


def test_a_worker_of_hundreds_of_threads_or_greenlets_answers_300_people_once_each(
        redis: redis_lib.Redis, slow_bot: Bot, twilio: TwilioStandin, worker_process: Process) -> None:
    """A slow engine keeps 150 threads busy at once: every person gets one reply, the log no pool error or lost lease."""
    # Given 300 people writing at once to a bot whose engine takes 1 s
    senders = [f"+1555{index:07d}" for index in range(PEOPLE)]
    for sender in senders:
        send(redis, slow_bot, f"hello from {sender}", sender)

    # When the worker has answered them
    twilio.wait_for(PEOPLE, timeout=90)
    time.sleep(1.0)  # room for a duplicate to show up, were one coming

    # Then each person got exactly one reply, and the worker logged no refusal or lost lease
    replies = sorted((message.to, message.body) for message in twilio.messages)
    assert sorted((sender, f"reply to hello from {sender}") for sender in senders) == replies
    log = worker_process.log
    assert {"Too many connections": 0, "lease_lost": 0, "lease.lost": 0, "Traceback": 0} == {
        text: log.count(text) for text in ("Too many connections", "lease_lost", "lease.lost", "Traceback")
    }


def test_a_forked_child_uses_connections_of_its_own(redis_url: str) -> None:
    """gunicorn and dramatiq fork their workers: a pool used before the fork hands the child new
    connections (its own CLIENT ID), never the parent's socket, and the parent's still works."""
    import os

    client = connect(redis_url)
    parent_id = client.client_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its connection's id, or the error
        try:
            answer = str(client.client_id()).encode()
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            answer = repr(error).encode()
        os.write(write, answer)
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        child_answer = pipe.read().decode()
    assert 0 == status
    assert child_answer.isdigit() and int(child_answer) != parent_id, child_answer
    assert parent_id == client.client_id()
