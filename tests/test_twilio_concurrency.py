"""Twilio's concurrency: a worker process keeps at most TWILIO_MAX_CONCURRENT_REQUESTS requests open
per Twilio account; the rest queue for a slot, their timeouts not yet running, and one that never
got a slot is "later", never an unknown outcome."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import pytest
import redis as redis_lib

from cli.twilio_standin import TwilioStandin
from shared.bots import Bot, BotStore
from shared.twilio_errors import Action, action_for
from tests.conftest import BOT_ACCOUNT_SID
from tests.support.processes import Process, start_worker
from tests.test_outbound import make_bot
from tests.test_pools import send
from worker import twilio_client
from worker.twilio_client import Accepted, Refused, get_client, outcome_unknown, send_sms

BOUND = 10
PEOPLE_PER_BOT = 1000  # two bots of one account: a burst of 2,000 replies


def burst(clients: int, account: str, standin: TwilioStandin, bound: int) -> list[Accepted | Refused]:
    """`clients` threads sending one message each at the same moment, through one account's client."""
    client = get_client(account, "token", standin.url, bound)
    start = threading.Barrier(clients)
    results: list[Accepted | Refused] = []

    def one(index: int) -> None:
        start.wait()
        results.append(send_sms(client, "+15005550006", f"+1555{index:07d}", f"burst {index}", None, None))

    threads = [threading.Thread(target=one, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_waiting_for_a_slot_does_not_count_against_the_requests_timeout(
        twilio: TwilioStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three sends through one slot, each answered in 0.6 s with a 1 s read timeout: the third waits 1.2 s
    for its slot, and is still accepted."""
    # Given one request in flight per account, a read timeout of 1 s, and a Twilio taking 0.6 s per create
    twilio.reset()
    monkeypatch.setattr(twilio_client, "READ_TIMEOUT", 1.0)
    twilio.take_time(0.6)
    # When three replies are sent at once
    results = burst(3, "AC" + "1" * 32, twilio, 1)
    # Then they went one after the other, and each was accepted
    assert ([True] * 3, 1) == ([isinstance(result, Accepted) for result in results], twilio.most_open("AC" + "1" * 32))


def test_a_send_that_finds_no_slot_in_time_is_later_and_never_reaches_twilio(
        twilio: TwilioStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send still waiting for a slot after SLOT_WAIT_SECONDS is refused as Twilio refuses past its limit
    (20429: retried later), its outcome known: it was never sent."""
    # Given one request in flight per account, slots waited for 0.2 s, and a Twilio taking 1 s per create
    twilio.reset()
    monkeypatch.setattr(twilio_client, "SLOT_WAIT_SECONDS", 0.2)
    twilio.take_time(1.0)
    # When two replies are sent at once
    results = burst(2, "AC" + "2" * 32, twilio, 1)
    # Then one is accepted, and the other is "later" without having been posted
    [refused] = [result for result in results if isinstance(result, Refused)]
    assert ((429, 20429), Action.RETRY, False, 1) == ((refused.http_status, refused.code),
                                                      action_for(refused.http_status, refused.code),
                                                      outcome_unknown(refused), len(twilio.attempts))


@pytest.fixture(params=[("threads", 150), ("gevent", 400)], ids=["threads", "gevent"])
def bounded_worker(request: pytest.FixtureRequest, worker_env: dict[str, str], redis: redis_lib.Redis,
                   twilio: TwilioStandin) -> Iterator[Process]:
    """One Procfile worker process of 150 threads or 400 greenlets, allowed BOUND requests per Twilio account."""
    pool, threads = request.param
    twilio.reset()
    twilio.take_time(0.02)
    env = {**worker_env, "WORKER_POOL": pool, "TWILIO_MAX_CONCURRENT_REQUESTS": str(BOUND)}
    with start_worker(env, processes=1, threads=threads) as worker:
        assert re.search(rf"\bpool\W{{1,4}}{pool}\b", worker.log), worker.log[-2000:]
        yield worker


@pytest.fixture
def two_bots_of_one_account(store: BotStore) -> list[Bot]:
    # Paced at 1,000 messages a second each: the account's slots, not the numbers' pace, hold the burst back.
    return [make_bot(store, number, rate=1000) for number in ("+15550002801", "+15550002802")]


def test_a_burst_of_2000_replies_never_holds_more_requests_open_than_the_setting(
        redis: redis_lib.Redis, two_bots_of_one_account: list[Bot], twilio: TwilioStandin,
        bounded_worker: Process) -> None:
    """2,000 people texting two bots of one Twilio account at once each get one reply, and Twilio never has
    more than TWILIO_MAX_CONCURRENT_REQUESTS of the account's requests open at once, nor an unknown outcome."""
    # Given 1,000 people writing at once to each of two bots of one account, and a Twilio taking 20 ms a create
    expected = []
    for bot in two_bots_of_one_account:
        for index in range(PEOPLE_PER_BOT):
            sender = f"+1556{bot.id % 10}{index:06d}"
            send(redis, bot, f"hi {index}", sender)
            expected.append((bot.number, sender, f"echo: hi {index}"))

    # When the worker has answered them
    twilio.wait_for(len(expected), timeout=240)
    time.sleep(1.0)  # room for a duplicate to show up, were one coming

    # Then each got exactly one reply, with the account's requests held to the bound: queued, none refused or unknown
    replies = sorted((message.from_, message.to, message.body) for message in twilio.messages)
    log = bounded_worker.log
    assert (sorted(expected), BOUND, 0, 0) == (replies, twilio.most_open(BOT_ACCOUNT_SID),
                                               log.count("outcome_unknown"), log.count("no slot among"))
