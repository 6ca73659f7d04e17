"""A reply is sent exactly once even when the answer to its send is lost: real worker processes, the
Twilio stand-in, and (for status callbacks) the real web process.

Twilio's Messages API has no idempotency key, so a send whose answer never arrived (a dropped
connection, a read timeout, a worker killed between Twilio's 201 and its bookkeeping) is settled by
a status callback naming the reply, or by Twilio's message list; it is sent again only when Twilio
does not have it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis as redis_lib

from cli.twilio_standin import TwilioStandin
from shared.bots import Bot, BotStore
from tests.conftest import free_port
from tests.support.fake_engine import FakeEngine
from tests.support.processes import Process, start_web, start_worker
from tests.support.proxy import CuttableProxy
from tests.test_crash_recovery import SENDER, bodies_to, send

ANSWER = ("first reply", "second reply")


@pytest.fixture
def two_replies_bot(bot: Bot, store: BotStore, engine: FakeEngine) -> Bot:
    engine.answer = lambda payload: [{"recipient_id": payload["sender"], "text": text} for text in ANSWER]
    return store.update(bot.id, {"engine-url": engine.url, "messages-per-second": 50})


@pytest.fixture
def processes(worker_env: dict[str, str], twilio: TwilioStandin) -> Iterator[list[Process]]:
    twilio.reset()
    started: list[Process] = []
    yield started
    for process in started:
        process.stop(5)


def reconciled(process: Process) -> list[str]:
    """How each reconciliation the process logged was settled (its log is console lines in development)."""
    hows = []
    for line in process.log.splitlines():
        if "outbound.reconciled" not in line:
            continue
        if line.startswith("{"):
            hows.append(json.loads(line)["how"])
        else:
            hows.append(line.split("how=")[1].split()[0] if "how=" in line else "?")
    return hows


def test_a_send_whose_connection_dropped_after_twilio_accepted_it_is_not_sent_again(
        redis: redis_lib.Redis, two_replies_bot: Bot, twilio: TwilioStandin, processes: list[Process],
        worker_env: dict[str, str]) -> None:
    # Given a Twilio that accepts the first send, then drops the connection without answering
    twilio.accept_then_drop(count=1)
    processes.append(worker := start_worker(worker_env, processes=1, threads=4))

    # When a message is answered with two replies
    send(redis, two_replies_bot, "hola")

    # Then each reply reaches the person once, in order: the first was found in Twilio's list
    twilio.wait_for(2, timeout=30)
    time.sleep(1.0)  # room for a repeat, were one coming
    assert list(ANSWER) == bodies_to(twilio, SENDER)
    assert ["lookup-found"] == reconciled(worker)


def test_a_worker_killed_between_twilios_answer_and_its_bookkeeping_sends_nothing_twice(
        redis: redis_lib.Redis, two_replies_bot: Bot, twilio: TwilioStandin, processes: list[Process],
        worker_env: dict[str, str]) -> None:
    # When a worker is killed after Twilio accepted its first send, before the answer arrived
    second = killed_after_twilio_accepted(redis, two_replies_bot, twilio, processes, worker_env)

    # Then the first reply is settled from Twilio's list, not sent again, and the second follows it
    assert list(ANSWER) == bodies_to(twilio, SENDER)
    assert ["lookup-found"] == reconciled(second)


def test_a_status_callback_naming_the_reply_settles_it_without_asking_twilio(
        redis: redis_lib.Redis, two_replies_bot: Bot, processes: list[Process], worker_env: dict[str, str]) -> None:
    """With PUBLIC_URL, Twilio's status callback carries the reply's id: the web records the SID, and the
    worker that takes over finishes the reply with it, within the grace period, without a lookup."""
    port = free_port()
    with TwilioStandin(status_callbacks=True) as twilio:
        env = {**worker_env, "TWILIO_API_BASE_URL": twilio.url, "PUBLIC_URL": f"http://127.0.0.1:{port}",
               "SEND_RECONCILE_SECONDS": "600"}
        processes.append(start_web(env, port))
        second = killed_after_twilio_accepted(redis, two_replies_bot, twilio, processes, env)
        assert list(ANSWER) == bodies_to(twilio, SENDER)
    assert ["callback"] == reconciled(second)


def killed_after_twilio_accepted(redis: redis_lib.Redis, bot: Bot, twilio: TwilioStandin, processes: list[Process],
                                 env: dict[str, str]) -> Process:
    """Kill a worker whose first send Twilio accepted but whose answer has not arrived yet; return the
    worker that took over, once both replies reached Twilio (and a moment for a repeat to show)."""
    twilio.accept_then_delay(30.0, count=1)
    processes.append(first := start_worker(env, processes=1, threads=4))
    send(redis, bot, "hola")
    twilio.wait_for(1, timeout=30)
    first.kill()
    processes.append(second := start_worker(env, processes=1, threads=4))
    twilio.wait_for(2, timeout=60)
    time.sleep(1.0)
    return second


def test_redis_unreachable_right_after_twilios_answer_sends_nothing_twice(
        redis: redis_lib.Redis, redis_url: str, two_replies_bot: Bot, twilio: TwilioStandin,
        processes: list[Process], worker_env: dict[str, str]) -> None:
    """Twilio accepts the first reply and, as its answer arrives, Redis is unreachable for 3 s: the send
    cannot be recorded. Once Redis is back, the reply is settled from Twilio's list, not sent again."""
    parts = urlsplit(redis_url)
    with CuttableProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
        env = {**worker_env, "REDIS_URL": f"redis://127.0.0.1:{proxy.port}{parts.path or '/0'}"}
        twilio.accept_then_delay(1.0, count=1)
        processes.append(worker := start_worker(env, processes=1, threads=4))
        send(redis, two_replies_bot, "hola")
        twilio.wait_for(1, timeout=30)  # Twilio has it; its answer comes in 1 s, into a Redis that is gone
        proxy.cut()
        time.sleep(3.0)
        proxy.restore()

        twilio.wait_for(2, timeout=90)
        time.sleep(1.0)
        assert list(ANSWER) == bodies_to(twilio, SENDER)
        assert ["lookup-found"] == reconciled(worker)
