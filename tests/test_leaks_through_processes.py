"""Issue 22's leaking promises, kept by the service as deployed: the Procfile's web and worker
processes, reached over HTTP as an operator, an engine and Twilio reach them (the Twilio stand-in,
a fake engine, a handoff-url of our own), with the database read only to see what it kept.

One web and one worker serve the whole file (starting them is most of a test's time); each test
uses bots, numbers and people of its own, so what one leaves behind cannot answer for another.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis as redis_lib
import requests
from sqlalchemy import Engine
from twilio.request_validator import RequestValidator

from cli.twilio_standin import SentMessage, TwilioStandin
from shared import db, keys, optout
from shared.redis import connect
from shared.schema import conversations, deliveries, handoffs, messages
from tests.conftest import BOT_ACCOUNT_SID, BOT_AUTH_TOKEN, _empty, free_port
from tests.support.carrier import carrying
from tests.support.fake_engine import FakeEngine
from tests.support.processes import Process, start_web, start_worker
from tests.support.receiver import Receiver
from tests.test_erasure import count
from tests.test_flushall import bodies_to, wait_until
from tests.test_tenant_bounds import USERS
from tests.test_tenant_bounds import Service as TenantService

DIRTY = "a\u0000b\u001b[2Jc\u007f"  # a NUL, a terminal escape, a DEL
CLEAN = "ab[2Jc"


class Service(TenantService):
    """The web and worker processes; the worker's log tells when it has handled something."""

    def __init__(self, port: int, env: dict[str, str], worker: Process) -> None:
        super().__init__(port, env)
        self.worker = worker

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.base}{USERS}{path}", headers=self.headers, timeout=15, **kwargs)

    def push(self, bot_id: int, token: str, body: Any) -> requests.Response:
        """An engine's callback, with the bot's engine token."""
        return requests.post(f"{self.base}/channels/sms/callback/{bot_id}", json=body, timeout=15,
                             headers={"Authorization": f"Bearer {token}"})

    def inbound(self, form: dict[str, str]) -> int:
        """A signed webhook of Twilio's with these fields (MessagingServiceSid among them, say)."""
        url = self.base + "/channels/sms/"
        form = {"MessageSid": f"SM{uuid.uuid4().hex}", "AccountSid": BOT_ACCOUNT_SID, "NumMedia": "0", **form}
        signature = RequestValidator(BOT_AUTH_TOKEN).compute_signature(url, form)
        return requests.post(url, data=form, headers={"X-Twilio-Signature": signature}, timeout=15).status_code

    def conversations(self, bot_id: int) -> dict[str, dict[str, Any]]:
        listed = self.api("GET", f":{bot_id}/conversations")
        assert 200 == listed.status_code, listed.text
        return {entry["person"]: entry for entry in listed.json()["data"]["conversations"]}

    def logged(self, bot_id: int, person: str) -> list[tuple[str, str, str]]:
        return [(entry["direction"], entry["text"], entry["status"]) for entry in self.log(bot_id, person)]

    def wait_for_worker_event(self, *events: str, after: int, timeout: float = 60.0) -> str:
        """The first of `events` the worker logs past character `after` of its log."""
        def seen() -> str | None:
            tail = self.worker.log[after:]
            return next((event for event in events if event in tail), None)

        return str(wait_until(seen, timeout=timeout, what=f"the worker to log one of {events}"))


@pytest.fixture(scope="module")
def sql(database_url: str) -> Iterator[Engine]:
    engine = db.make_engine(database_url, size=2)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def store_redis(redis_url: str) -> redis_lib.Redis:
    """The Redis the processes use, never flushed while they run (the per-test `redis` fixture would)."""
    return connect(redis_url)


@pytest.fixture(scope="module")
def service(worker_env: dict[str, str], redis_url: str, database_url: str,
            store_redis: redis_lib.Redis) -> Iterator[Service]:
    """One web and one worker for the file, over an empty Redis and database, both emptied again after."""
    store_redis.flushdb()
    _empty(database_url)
    port = free_port()
    started: list[Process] = [start_web(worker_env, port)]
    try:
        started.append(start_worker(worker_env, processes=1, threads=8))
        yield Service(port, worker_env, started[1])
    finally:
        for process in reversed(started):
            process.stop(10)
        store_redis.flushdb()
        _empty(database_url)


@pytest.fixture
def twilio_now(twilio: TwilioStandin, service: Service) -> TwilioStandin:
    """The session's stand-in, forgetting the messages of earlier tests."""
    twilio.reset()
    return twilio


def service_sid() -> str:
    return "MG" + uuid.uuid4().hex


def test_a_stop_holds_through_the_processes_when_the_bot_moves_onto_a_service_and_off_it(
        service: Service, twilio_now: TwilioStandin, sql: Engine) -> None:
    """STOP to bot G's number, then the service added and removed over the API: after each change the
    operator's send is 409, the engine's push is suppressed (nothing reaches Twilio), and /conversations
    says opted-out."""
    number, pool, person = "+15550014001", "+15550014002", "+15551114001"
    # Given a person who texted STOP to bot G's number
    sid = service_sid()
    twilio_now.set_service(sid, [number, pool])
    bot_id, token = service.create_bot(number, **{"allow-cold-push": True, "messages-per-second": 50})
    assert 200 == service.text(number, person, "STOP")

    def stopped() -> bool:
        with sql.connect() as connection:
            state = optout.read(connection, number, person)
        return bool(state and state.opted_out)

    wait_until(stopped, what="the STOP in the database")
    # When G is moved onto a service (the 10DLC step), then off it again: then G stays silent to them
    for change in ({"twilio-messaging-service-sid": sid}, {"twilio-messaging-service-sid": None}):
        changed = service.api("POST", f":{bot_id}", json=change)
        assert 200 == changed.status_code, changed.text
        sent = service.api("POST", f":{bot_id}/messages", json={"to": person, "text": "oferta"})
        assert (409, change) == (sent.status_code, change)
        pushed = service.push(bot_id, token, {"recipient_id": person, "text": f"push {change}"})
        assert 202 == pushed.status_code, pushed.text
        wait_until(lambda: ("out", f"push {change}", "suppressed") in service.logged(bot_id, person),
                   what=f"the push after {change} logged suppressed")
        assert True is service.conversations(bot_id)[person]["opted-out"]
    assert [] == bodies_to(twilio_now, person)


def test_an_erase_during_a_slow_engine_call_and_a_forward_held_for_later_leaves_nothing_sent_or_kept(
        service: Service, twilio_now: TwilioStandin, engine: FakeEngine, store_redis: redis_lib.Redis,
        sql: Engine) -> None:
    """A 6 s engine answering (and asking for a handoff), erased at 2 s; a paused person's forward the
    handoff-url refused (503), held for a later try: once the worker is past both, nothing was sent to
    either person, the forward was not POSTed again, and no row about them is in the database."""
    asking, paused = "+15551114101", "+15551114102"
    engine.delay = 6.0
    engine.answer = lambda payload: [{"recipient_id": payload["sender"], "text": "tarde"},
                                     {"custom": {"handoff": True, "note": "nota"}}]
    with Receiver(status=503) as receiver:
        number = "+15550014101"
        bot_id, _ = service.create_bot(number, **{"engine-url": engine.url, "handoff-url": receiver.url,
                                                  "messages-per-second": 50})
        # Given a forward the handoff-url refused, now waiting for its background try
        assert 200 == service.api("POST", f":{bot_id}/conversations/{quote(paused)}/handoff",
                                  json={"note": "Ana"}).status_code
        mark = len(service.worker.log)
        assert 200 == service.text(number, paused, "¿hay alguien?")
        service.wait_for_worker_event("handoff_forward.queued", after=mark)
        tried = len(receiver.received)
        assert tried >= 1
        # And a text the engine is 2 s into answering
        asked = len(service.worker.log)
        assert 200 == service.text(number, asking, "borra esto")
        engine.wait_for_calls(1, timeout=30)
        time.sleep(2.0)
        # When both people are erased, and the handoff-url is back
        for person in (asking, paused):
            assert 200 == service.api("DELETE", f":{bot_id}/conversations/{quote(person)}").status_code
        receiver.status = 200
        # Then the engine's answer is dropped, and so is the forward when its try comes (30 s after it was held)
        service.wait_for_worker_event("conversation.erased_meanwhile", "conversation.answered", after=asked)
        service.wait_for_worker_event("handoff_forward.dropped", "handoff_forward.delivered_later", after=mark,
                                      timeout=90)
        wait_until(lambda: store_redis.llen(keys.LOG_OUTBOX) == 0, what="the log drain caught up")
        assert tried == len(receiver.received)
    assert ([], []) == (bodies_to(twilio_now, asking), bodies_to(twilio_now, paused))
    for person in (asking, paused):
        assert (0, 0, 0) == (count(sql, messages, person=person), count(sql, conversations, person=person),
                             count(sql, handoffs, person=person)), person
    assert 0 == count(sql, deliveries, bot_id=bot_id)


def test_a_nul_in_every_field_is_no_5xx_and_every_exchange_reaches_the_database(
        service: Service, twilio_now: TwilioStandin, engine: FakeEngine, store_redis: redis_lib.Redis) -> None:
    """NUL (and other control characters) in a bot's name and fallback-message, an operator's send, an
    engine's callback, a handoff note and an engine's answer: each is taken without them, and the
    exchanges (the person's text included) are in the log, none set aside as refused."""
    number, answered, written, noted = "+15550014201", "+15551114201", "+15551114202", "+15551114203"
    engine.answer = lambda payload: [{"recipient_id": payload["sender"], "text": DIRTY},
                                     {"custom": {"handoff": True, "note": "nota" + DIRTY}}]
    bot_id, token = service.create_bot(number, **{
        "name": DIRTY, "fallback-message": DIRTY, "engine-url": engine.url, "allow-cold-push": True,
        "messages-per-second": 50})
    # Given a bot named and given a fallback-message with a NUL (its engine answers with one)
    [shown] = service.api("GET", f":{bot_id}").json()["data"]["user"]
    assert [CLEAN, CLEAN] == [shown["name"], shown["fallback-message"]]

    # When an operator, the engine's callback, a handoff note and the engine's answer each carry one
    sent = service.api("POST", f":{bot_id}/messages", json={"to": written, "text": "op " + DIRTY})
    pushed = service.push(bot_id, token, {"recipient_id": written, "text": "cb " + DIRTY})
    note = service.api("POST", f":{bot_id}/conversations/{quote(noted)}/handoff", json={"note": DIRTY})
    assert (202, 202, 200) == (sent.status_code, pushed.status_code, note.status_code), (sent.text, pushed.text,
                                                                                       note.text)
    assert 200 == service.text(number, answered, "hola")

    # Then each was taken and sent without them, and every exchange is in the log
    wait_until(lambda: len(bodies_to(twilio_now, written)) == 2 and bodies_to(twilio_now, answered),
               what="the three texts sent")
    assert (["op " + CLEAN, "cb " + CLEAN], [CLEAN]) == (bodies_to(twilio_now, written),
                                                         bodies_to(twilio_now, answered))
    wait_until(lambda: [("in", "hola"), ("out", CLEAN)] == [entry[:2] for entry in service.logged(bot_id, answered)],
               what="the engine's exchange in the log")
    assert [("out", "op " + CLEAN), ("out", "cb " + CLEAN)] == [entry[:2] for entry in service.logged(bot_id, written)]
    assert (CLEAN, "nota" + CLEAN) == (note.json()["data"]["handoff"]["note"],
                                       service.conversations(bot_id)[answered]["handoff"]["note"])
    assert 0 == store_redis.llen(keys.LOG_REFUSED)


def test_two_service_bots_texting_each_other_through_unlisted_pool_numbers_stop_at_once(
        service: Service, twilio_now: TwilioStandin) -> None:
    """Bot A's operator texts bot B's unlisted pool number, and Twilio carries each SMS between the two
    services (relayed here as signed inbounds to the web process): the echo bots stop after a reply or
    two, long before the replies-per-minute limit would stop them."""
    # Given two echo bots, each with a service of one pool number the registry does not list
    pool_a, pool_b = "+15550014301", "+15550014302"
    services = {pool_a: service_sid(), pool_b: service_sid()}
    bots = []
    for pool, sid in services.items():
        twilio_now.set_service(sid, [pool])
        bots.append(service.create_bot(pool, **{"main-phone-number": None, "twilio-messaging-service-sid": sid,
                                               "messages-per-second": 50})[0])
    def deliver(message: SentMessage, sid: str) -> None:
        service.inbound({"From": message.from_ or "", "To": message.to, "Body": message.body,
                         "MessagingServiceSid": sid})

    # When bot A's operator texts bot B's pool number, and Twilio carries every SMS between them
    with carrying(twilio_now, services, deliver):
        sent = service.api("POST", f":{bots[0]}/messages", json={"to": pool_b, "text": "hola"})
        assert 202 == sent.status_code, sent.text
        wait_until(lambda: twilio_now.messages, what="the first text sent")
        time.sleep(8.0)  # unchecked, the bots would go on replying all this while
    # Then they stopped at once
    between_bots = [message.body for message in twilio_now.messages if message.to in services]
    assert 1 <= len(between_bots) <= 3, between_bots
