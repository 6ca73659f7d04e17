"""Redis loses everything (FLUSHALL, a restart without persistence) while the service runs: nothing durable goes.

Everything here goes through the Procfile's real web and worker processes, over HTTP, as an
operator and Twilio would: the registry API, signed webhooks, the Twilio stand-in, `mammut-sms dlq`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import requests
from twilio.request_validator import RequestValidator

from cli.dev import embedded_redis
from cli.twilio_standin import TwilioStandin
from shared import keys
from shared.redis import connect
from tests.conftest import ADMIN_TOKEN, BOT_ACCOUNT_SID, BOT_AUTH_TOKEN, free_port
from tests.support.processes import Process, start_web, start_worker

BOT_A, BOT_B = "+15005550006", "+15005550007"
TALKER, OTHER, STOPPER, UNREACHABLE = "+15551110001", "+15551110002", "+15551110003", "+15551110004"
API = "/app:mammut-1/graph/user"


class Service:
    """The running web process, reached as Twilio and an operator reach it."""

    def __init__(self, port: int, env: dict[str, str]) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.env = env
        self.headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        self._sent = 0

    def register(self, number: str) -> int:
        response = requests.post(self.base + API, headers=self.headers, timeout=10, json={
            "user-type": "machine", "name": f"bot {number}", "twilio-account-sid": BOT_ACCOUNT_SID,
            "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": number, "messages-per-second": 50})
        assert 200 == response.status_code, response.text
        return int(response.json()["taskResult"][0]["affectedElementId"])

    def text(self, bot_number: str, person: str, body: str) -> int:
        """A signed inbound SMS, as Twilio posts it; returns the webhook's status code."""
        self._sent += 1
        url = self.base + "/channels/sms/"
        form = {"MessageSid": f"SM{time.time_ns():024x}{self._sent:08d}", "AccountSid": BOT_ACCOUNT_SID,
                "From": person, "To": bot_number, "Body": body, "NumMedia": "0"}
        signature = RequestValidator(BOT_AUTH_TOKEN).compute_signature(url, form)
        return requests.post(url, data=form, headers={"X-Twilio-Signature": signature}, timeout=10).status_code

    def log(self, bot_id: int, person: str) -> list[dict[str, Any]]:
        response = requests.get(f"{self.base}{API}:{bot_id}/messages", params={"with": person}, headers=self.headers,
                                timeout=10)
        assert 200 == response.status_code, response.text
        return response.json()["data"]["messages"]

    def bots(self) -> list[dict[str, Any]]:
        return requests.get(self.base + API, headers=self.headers, timeout=10).json()["data"]["user"]

    def dead_letters(self) -> list[dict[str, Any]]:
        result = subprocess.run([sys.executable, "-m", "cli.main", "dlq", "list", "--json"], env=self.env,
                                capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
        assert 0 == result.returncode, result.stderr
        return json.loads(result.stdout)


def wait_until(condition: Any, timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def bodies_to(twilio: TwilioStandin, person: str) -> list[str]:
    return [message.body for message in twilio.messages if message.to == person]


class RedisServer:
    """A redis-server process of a test's own, on a free port, keeping nothing on disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self.client = connect(f"redis://127.0.0.1:{self.port}/0")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _answers(self.client), timeout=10, what="redis-server to start")
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer | None]:
    """A redis-server of this test's own (None where the binary is missing: fakeredis stands in)."""
    if not shutil.which("redis-server"):
        yield None
        return
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_redis(redis_server: RedisServer | None) -> Iterator[redis_lib.Redis]:
    """A Redis of this test's own, so FLUSHALL wipes nothing but the service under test's."""
    if redis_server is None:
        with embedded_redis() as url:
            yield connect(url)
        return
    yield redis_server.client


def _answers(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.RedisError:
        return False


def service_env(worker_env: dict[str, str], private_redis: redis_lib.Redis, port: int) -> dict[str, str]:
    """The Procfile processes' environment: the test's own Redis, the echo engine, callbacks to `port`."""
    redis_url = "redis://{host}:{port}/0".format(**private_redis.connection_pool.connection_kwargs)
    return {**worker_env, "REDIS_URL": redis_url, "ENGINE_URL": "", "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "LOG_LEVEL": "INFO"}


@pytest.fixture
def service(worker_env: dict[str, str], private_redis: redis_lib.Redis, database: str,
            twilio: TwilioStandin) -> Iterator[Service]:
    twilio.reset()
    port = free_port()
    env = service_env(worker_env, private_redis, port)
    processes: list[Process] = []
    try:
        processes.append(start_web(env, port))
        processes.append(start_worker(env, processes=1, threads=8))
        yield Service(port, env)
    finally:
        for process in processes:
            process.stop(10)


def test_after_flushall_the_service_answers_remembers_opt_outs_and_keeps_every_record(
        service: Service, private_redis: redis_lib.Redis, twilio: TwilioStandin) -> None:
    """Bots, opt-outs, the conversation log and dead letters live in the database, not in Redis."""
    # Given two bots that have talked, a person who texted STOP, and a reply that failed for good
    bot_a, bot_b = service.register(BOT_A), service.register(BOT_B)
    twilio.fail_always(to=UNREACHABLE, code=21211)
    assert [200, 200, 200, 200] == [service.text(BOT_A, TALKER, "one"), service.text(BOT_B, OTHER, "hello"),
                                    service.text(BOT_A, STOPPER, "STOP"), service.text(BOT_A, UNREACHABLE, "hi")]
    wait_until(lambda: bodies_to(twilio, TALKER) and bodies_to(twilio, OTHER), what="the first replies")
    wait_until(lambda: service.dead_letters(), what="the dead letter")
    # (the log's records reach the database within a moment; those still in Redis are work in flight)
    wait_until(lambda: private_redis.llen(keys.LOG_OUTBOX) == 0, what="the log written")

    # When Redis loses everything while web and worker run
    private_redis.flushall()

    # Then each bot still answers its next message (no 404: the registry is in the database)
    assert [200, 200] == [service.text(BOT_A, TALKER, "two"), service.text(BOT_B, OTHER, "again")]
    wait_until(lambda: len(bodies_to(twilio, TALKER)) == 2 and len(bodies_to(twilio, OTHER)) == 2,
               what="the replies after the flush")
    # and the person who opted out before the flush still receives nothing
    assert 200 == service.text(BOT_A, STOPPER, "anyone there?")
    wait_until(lambda: any(entry["text"] == "echo: anyone there?" and entry["status"] == "suppressed"
                           for entry in service.log(bot_a, STOPPER)), what="the suppressed reply")
    assert [] == bodies_to(twilio, STOPPER)
    # until they text START
    assert 200 == service.text(BOT_A, STOPPER, "START")
    assert 200 == service.text(BOT_A, STOPPER, "back")
    wait_until(lambda: any("back" in body for body in bodies_to(twilio, STOPPER)), what="the reply after START")
    # and the registry, the conversation log and the dead letters are complete
    assert {BOT_A, BOT_B} == {bot["main-phone-number"] for bot in service.bots()}
    talker_log = service.log(bot_a, TALKER)
    assert ["in", "out", "in", "out"] == [entry["direction"] for entry in talker_log]
    assert all(entry["sid"] for entry in talker_log)
    assert ["one", "two"] == [entry["text"] for entry in talker_log if entry["direction"] == "in"]
    assert ["in", "out", "in", "out"] == [entry["direction"] for entry in service.log(bot_b, OTHER)]
    dead = service.dead_letters()
    assert [(UNREACHABLE, 21211)] == [(entry["to"], entry["error_code"]) for entry in dead]


def test_after_a_redis_restart_the_running_service_answers_again(
        service: Service, redis_server: RedisServer | None, twilio: TwilioStandin) -> None:
    """The Redis server goes away mid-load and comes back empty (a restart without persistence, a
    failover): web and worker reconnect by themselves, with no restart of their own, and answer."""
    if redis_server is None:
        pytest.skip("needs a redis-server binary to restart")
    # Given a service answering a steady stream of texts
    service.register(BOT_A)
    people = [f"+1555222{n:04d}" for n in range(20)]
    assert {200} == {service.text(BOT_A, person, "before") for person in people}
    wait_until(lambda: all(bodies_to(twilio, person) for person in people), what="the replies before")

    # When the Redis server stops and, a few seconds later, starts again empty on the same port
    redis_server.stop()
    time.sleep(3.0)
    redis_server.start()

    # Then texts are acknowledged again within moments (Twilio retries those refused meanwhile)
    wait_until(lambda: service.text(BOT_A, TALKER, "after") == 200, timeout=30, what="the webhook back")
    # and every person who texts is answered, once
    assert {200} == {service.text(BOT_A, person, "after") for person in people}
    wait_until(lambda: all(len(bodies_to(twilio, person)) == 2 for person in people), timeout=60,
               what="the replies after the restart")
    assert {2} == {len(bodies_to(twilio, person)) for person in people}
