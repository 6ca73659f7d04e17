"""One tenant against all of them: what a bot's engine can make the service do through its callback
is bounded as its direct answers are, and a Redis that refuses writes refuses work cleanly."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib
import requests
from flask.testing import FlaskClient
from sqlalchemy import func, select

from cli.twilio_standin import TwilioStandin
from shared import handoff, keys
from shared.bots import Bot, BotStore
from shared.conversations import INBOUND, accept_inbound
from shared.db import get_engine
from shared.schema import messages
from shared.segments import count_segments
from shared.settings import Settings
from tests.conftest import BOT_ACCOUNT_SID, BOT_AUTH_TOKEN, free_port
from tests.support.fake_engine import FakeEngine
from tests.support.processes import Process, start_web, start_worker
from tests.support.receiver import Receiver
from tests.test_crash_recovery import engine_bot, send  # noqa: F401 (fixture)
from tests.test_flushall import Service as ProcfileService
from tests.test_handoff import handed, receiver  # noqa: F401 (fixture)

PERSON, OTHER_PERSON = "+15551230001", "+15551230002"
USERS = "/app:mammut-1/graph/user"


def callback(bot_id: int) -> str:
    return f"/channels/sms/callback/{bot_id}"


def outbox_of(redis: redis_lib.Redis, bot: Bot | int, person: str = PERSON) -> list[dict[str, Any]]:
    conversation = keys.conversation_id(bot if isinstance(bot, int) else bot.id, person)
    ids = redis.lrange(keys.outbox(conversation), 0, -1)
    return [json.loads(raw) for raw in redis.hmget(keys.replies(conversation), ids)] if ids else []


@pytest.fixture
def pushing(bot: Bot, store: BotStore) -> Bot:
    """A bot whose engine may push to anyone (the push window is not what these tests are about)."""
    return store.update(bot.id, {"allow-cold-push": True})


class TestPushesObeyTheBotsLimits:
    """A callback makes the bot say no more than a direct answer could, and never queues without end."""

    def test_a_callback_is_cut_to_max_replies_and_max_segments_per_person(
            self, client: FlaskClient, admin_headers: dict[str, str], pushing: Bot, store: BotStore,
            redis: redis_lib.Redis) -> None:
        """A bot set to 2 replies / 3 segments sends a person at most that of a 100-item callback."""
        store.update(pushing.id, {"max-replies": 2, "max-segments": 3})
        body = [{"recipient_id": PERSON, "text": "palabra " * 75} for _ in range(100)]

        response = client.post(callback(pushing.id), headers=admin_headers, json=body)

        assert 202 == response.status_code
        queued = outbox_of(redis, pushing)
        assert len(queued) <= 2
        assert sum(count_segments(reply["text"]) for reply in queued) <= 3
        assert response.json["data"]["queued"] == len(queued)

    def test_a_person_who_had_max_replies_per_minute_gets_no_push_until_the_minute_ends(
            self, client: FlaskClient, admin_headers: dict[str, str], pushing: Bot, store: BotStore,
            redis: redis_lib.Redis) -> None:
        """Pushes count toward the person's max-replies-per-minute; past it a push is refused with 429 and Retry-After."""
        store.update(pushing.id, {"max-replies-per-minute": 3})
        two = [{"recipient_id": PERSON, "text": "uno"}, {"recipient_id": PERSON, "text": "dos"}]

        answers = [client.post(callback(pushing.id), headers=admin_headers, json=two) for _ in range(3)]

        assert [202, 202, 429] == [answer.status_code for answer in answers]
        assert 1 <= int(answers[2].headers["Retry-After"]) <= 60
        assert [PERSON] == answers[2].json["errors"]["recipient_id"]
        assert 4 == len(outbox_of(redis, pushing))

    def test_a_push_that_would_overfill_a_persons_outbox_is_refused_whole_with_retry_after(
            self, client: FlaskClient, admin_headers: dict[str, str], pushing: Bot, store: BotStore,
            redis: redis_lib.Redis) -> None:
        """max-queued-replies bounds what waits for one person: a push past it queues nothing, for anyone, and says when to retry."""
        store.update(pushing.id, {"max-queued-replies": 3, "max-replies-per-minute": 0})
        assert 202 == client.post(callback(pushing.id), headers=admin_headers, json=[
            {"recipient_id": PERSON, "text": "uno"}, {"recipient_id": PERSON, "text": "dos"}]).status_code

        refused = client.post(callback(pushing.id), headers=admin_headers, json=[
            {"recipient_id": OTHER_PERSON, "text": "a"},
            {"recipient_id": PERSON, "text": "tres"}, {"recipient_id": PERSON, "text": "cuatro"}])

        assert (429, [PERSON]) == (refused.status_code, refused.json["errors"]["recipient_id"])
        assert int(refused.headers["Retry-After"]) >= 1
        assert (["uno", "dos"], []) == ([r["text"] for r in outbox_of(redis, pushing)],
                                        outbox_of(redis, pushing, OTHER_PERSON))

    def test_a_bots_pushes_stop_for_the_day_at_max_messages_per_day(
            self, client: FlaskClient, admin_headers: dict[str, str], pushing: Bot, store: BotStore,
            redis: redis_lib.Redis) -> None:
        """Whatever the recipients, a bot's callback queues at most max-messages-per-day replies a UTC day: past it, 429."""
        store.update(pushing.id, {"max-messages-per-day": 3, "max-replies-per-minute": 0})
        first = [{"recipient_id": PERSON, "text": "uno"}, {"recipient_id": OTHER_PERSON, "text": "dos"}]
        assert 202 == client.post(callback(pushing.id), headers=admin_headers, json=first).status_code

        refused = client.post(callback(pushing.id), headers=admin_headers, json=[
            {"recipient_id": "+15551230003", "text": "tres"}, {"recipient_id": "+15551230004", "text": "cuatro"}])

        assert 429 == refused.status_code
        assert 0 < int(refused.headers["Retry-After"]) <= 86400
        assert ([], []) == (outbox_of(redis, pushing, "+15551230003"), outbox_of(redis, pushing, "+15551230004"))

    def test_the_new_limits_are_validated_and_shown_with_their_defaults(
            self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot) -> None:
        """max-queued-replies and max-segments-per-day are bot fields with defaults; out-of-range values are 400s naming them."""
        url = f"{USERS}:{bot.id}"
        shown = client.get(url, headers=admin_headers).json["data"]["user"][0]
        bad = client.post(url, headers=admin_headers, json={"max-queued-replies": 0, "max-segments-per-day": -1})

        assert (50, 30_000) == (shown["max-queued-replies"], shown["max-segments-per-day"])
        assert 400 == bad.status_code
        assert {"max-queued-replies", "max-segments-per-day"} <= set(bad.json["errors"])


@pytest.fixture
def full_redis(redis: redis_lib.Redis) -> Iterator[redis_lib.Redis]:
    """The test Redis refusing every write, as one at its maxmemory (noeviction) does; restored after."""
    saved = redis.config_get("maxmemory")["maxmemory"], redis.config_get("maxmemory-policy")["maxmemory-policy"]
    redis.config_set("maxmemory-policy", "noeviction")
    redis.config_set("maxmemory", 1)
    try:
        yield redis
    finally:
        redis.config_set("maxmemory", saved[0])
        redis.config_set("maxmemory-policy", saved[1])


def test_a_redis_that_refuses_writes_refuses_callbacks_and_readiness_and_leaves_no_log_rows(
        client: FlaskClient, admin_headers: dict[str, str], pushing: Bot, full_redis: redis_lib.Redis,
        settings: Settings) -> None:
    """Out of memory: an engine's callback and an operator's send are 503s with Retry-After, /readyz is 503,
    and no log row waits 'pending' forever."""
    pushed = client.post(callback(pushing.id), headers=admin_headers, json={"recipient_id": PERSON, "text": "hola"})
    sent = client.post(f"{USERS}:{pushing.id}/messages", headers=admin_headers, json={"to": PERSON, "text": "hola"})
    ready = client.get("/readyz")

    assert (503, 503, 503) == (pushed.status_code, sent.status_code, ready.status_code)
    assert int(pushed.headers["Retry-After"]) > 0 and int(sent.headers["Retry-After"]) > 0
    with get_engine(settings).connect() as connection:
        assert 0 == connection.execute(select(func.count()).select_from(messages)).scalar()


def test_readiness_holds_while_redis_takes_writes(client: FlaskClient) -> None:
    """A Redis that takes a write is ready."""
    assert 200 == client.get("/readyz").status_code


# --- Through the Procfile's processes -------------------------------------------------------------


class Service(ProcfileService):
    """The web and worker processes, with a tenant's-eye view: bots created and texts sent over HTTP."""

    def create_bot(self, number: str, **fields: Any) -> tuple[int, str]:
        """A bot, and its engine token."""
        created = requests.post(self.base + USERS, headers=self.headers, timeout=10, json={
            "user-type": "machine", "name": f"bot {number}", "twilio-account-sid": BOT_ACCOUNT_SID,
            "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": number, **fields}).json()["taskResult"][0]
        return created["affectedElementId"], created["engine-token"]


@pytest.fixture
def service(worker_env: dict[str, str], redis: redis_lib.Redis, database: str,
            twilio: TwilioStandin) -> Iterator[Service]:
    twilio.reset()
    port = free_port()
    started: list[Process] = [start_web(worker_env, port)]
    try:
        started.append(start_worker(worker_env, processes=1, threads=8))
        yield Service(port, worker_env)
    finally:
        for process in reversed(started):
            process.stop(10)


def test_a_flood_of_callbacks_with_one_bots_token_leaves_redis_bounded_and_other_bots_answered(
        service: Service, redis: redis_lib.Redis, engine: FakeEngine, twilio: TwilioStandin) -> None:
    """300 callbacks of 100 x 600 characters to a person who wrote: most are refused with 429, the person's
    outbox stays within max-queued-replies, Redis grows by little, and another bot's person is answered."""
    # Given a flooding bot (default limits) whose person wrote to it, and a second bot with its own engine
    flooder, token = service.create_bot("+15005550031")
    other, _ = service.create_bot("+15005550032", **{"engine-url": engine.url, "messages-per-second": 50})
    assert 200 == service.text("+15005550031", PERSON, "hola")
    before = redis.info("memory")["used_memory"]
    big = [{"recipient_id": PERSON, "text": "x" * 600} for _ in range(100)]
    statuses: list[int] = []

    def flood() -> None:
        with requests.Session() as session:
            for _ in range(30):
                statuses.append(session.post(service.base + callback(flooder), json=big, timeout=30,
                                             headers={"Authorization": f"Bearer {token}"}).status_code)

    # When ten engines' worth of callbacks arrive at once
    floods = [threading.Thread(target=flood) for _ in range(10)]
    for thread in floods:
        thread.start()
    assert 200 == service.text("+15005550032", OTHER_PERSON, "¿me oyen?")
    for thread in floods:
        thread.join()

    # Then the flood was refused past the bot's limits, and Redis holds a bounded amount of it
    assert 300 == len(statuses) and set(statuses) <= {202, 429} and 429 in statuses
    assert len(outbox_of(redis, flooder)) <= 50
    assert redis.info("memory")["used_memory"] - before < 5 * 2**20
    # And the other bot's person was answered
    twilio.wait_for(1, timeout=60)
    assert any(m.to == OTHER_PERSON and m.body == "reply to ¿me oyen?" for m in twilio.messages)


def test_an_engine_that_pushes_the_moment_it_is_asked_is_inside_the_push_window(
        service: Service, engine: FakeEngine, twilio: TwilioStandin) -> None:
    """An async engine posts its callback 0 s after being asked (before the log has the text): the push is sent."""
    pushed: list[int] = []
    bot_id, token = service.create_bot("+15005550033", **{"engine-url": engine.url, "messages-per-second": 50})

    def answer_by_callback(payload: dict[str, Any]) -> list[dict[str, Any]]:
        # Rasa's callback channel: the answer goes to the callback while the call is still open.
        pushed.append(requests.post(service.base + callback(bot_id), timeout=30,
                                    headers={"Authorization": f"Bearer {token}"},
                                    json={"recipient_id": payload["sender"], "text": "pensado"}).status_code)
        return []

    engine.answer = answer_by_callback

    assert 200 == service.text("+15005550033", PERSON, "¿qué opinas?")

    engine.wait_for_calls(1, timeout=30)
    twilio.wait_for(1, timeout=60)
    assert [202] == pushed
    assert ["pensado"] == [m.body for m in twilio.messages if m.to == PERSON]


def test_max_segments_per_day_bounds_what_a_day_of_long_unicode_answers_costs(
        redis: redis_lib.Redis, engine_bot: Bot, store: BotStore, engine: FakeEngine,  # noqa: F811
        twilio: TwilioStandin, worker: Any, logs: list[dict[str, object]]) -> None:
    """A 1,600-character UCS-2 answer is 24 segments: with max-segments-per-day 24, one such answer is the
    day's budget and the next is held back, though max-messages-per-day (10,000) is far off."""
    bot = store.update(engine_bot.id, {"max-segments-per-day": 24})
    engine.answer = lambda payload: [{"recipient_id": payload["sender"], "text": "中" * 1600}]

    send(redis, bot, "uno")
    twilio.wait_for(1, timeout=30)
    send(redis, bot, "dos")

    deadline = time.monotonic() + 30
    while not any(event["event"] == "outbound.held_back" for event in logs):
        assert time.monotonic() < deadline, "the second answer was not held back"
        time.sleep(0.1)
    assert 1 == len(twilio.messages)


class Dripping:
    """A handoff-url answering a byte every 0.5 s; counts the forwards that reached it."""

    def __init__(self) -> None:
        self.started = 0
        self._lock = threading.Lock()

    def __call__(self, handler: Any) -> None:
        with self._lock:
            self.started += 1
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n")
        for _ in range(60):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.5)


def test_a_dripping_handoff_url_holds_its_own_bots_slots_not_other_bots_threads(
        service: Service, engine: FakeEngine, twilio: TwilioStandin) -> None:
    """12 paused conversations whose handoff-url drips, on a worker of 8 threads: another bot's person is
    answered while the drips are still going, before the bot's later forwards have even started (they
    wait for its slots; without them the other bot's text waits for threads behind all twelve)."""
    from tests.test_engine_boundary import serving

    dripping = Dripping()
    with serving(dripping) as handoff_url:
        # Given a bot whose twelve conversations are with a human, behind a dripping handoff-url
        desk, _ = service.create_bot("+15005550034", **{"handoff-url": handoff_url.url(path="/handoff")})
        answering, _ = service.create_bot("+15005550035", **{"engine-url": engine.url, "messages-per-second": 50})
        people = [f"+1555123{n:04d}" for n in range(100, 112)]
        for person in people:
            assert 200 == requests.post(f"{service.base}{USERS}:{desk}/conversations/{person}/handoff",
                                        headers=service.headers, json={"note": "Ana"}, timeout=10).status_code
        # When each of them texts, and the forwards start dripping
        for person in people:
            assert 200 == service.text("+15005550034", person, "¿hola?")
        deadline = time.monotonic() + 30
        while dripping.started < 2:
            assert time.monotonic() < deadline, "no forward reached the handoff-url"
            time.sleep(0.05)
        assert 200 == service.text("+15005550035", OTHER_PERSON, "¿y yo?")

        # Then the other bot's person is answered while the drips still hold the desk bot's slots
        twilio.wait_for(1, timeout=60)
        started = dripping.started
        assert ["reply to ¿y yo?"] == [m.body for m in twilio.messages if m.to == OTHER_PERSON]
        assert started < len(people)


def test_a_background_forward_waits_for_its_bots_slots_without_spending_a_try(
        handed: tuple[Bot, str], receiver: Receiver, broker: Any, redis: redis_lib.Redis) -> None:
    """A forward tried again from the background while the bot's slots are all in use is put back, not sent."""
    from worker import handoff as forwarding
    from worker.slots import ENGINE_SLOTS, default_limit

    bot, _ = handed
    payload = {"bot_id": bot.id, "person": PERSON, "text": "¿hola?", "message_sid": "SM" + "3" * 32}
    with contextlib.ExitStack() as held:
        for _ in range(bot.limits.max_concurrent_engine_calls or default_limit()):
            assert held.enter_context(ENGINE_SLOTS.taken(bot))

        forwarding.forward_later.fn(bot.id, payload)

    assert [] == receiver.received
    [again] = [json.loads(raw) for raw in redis.hvals("dramatiq:outbound.DQ.msgs")]
    assert ([bot.id, payload], 0) == (again["args"], again["options"].get("retries", 0))


def test_a_push_erased_before_the_log_wrote_it_is_not_brought_back(
        client: FlaskClient, admin_headers: dict[str, str], pushing: Bot, redis: redis_lib.Redis,
        settings: Settings) -> None:
    """A push's log record waits in Redis; erasing the person first means the log's writer drops it."""
    from tests.support.messagelog import log_written

    assert 202 == client.post(callback(pushing.id), headers=admin_headers,
                              json={"recipient_id": PERSON, "text": "recordatorio"}).status_code
    assert 200 == client.delete(f"{USERS}:{pushing.id}/conversations/{PERSON}", headers=admin_headers).status_code

    log_written(redis, get_engine(settings))

    with get_engine(settings).connect() as connection:
        assert 0 == connection.execute(select(func.count()).select_from(messages)).scalar()


def test_an_engine_answering_someone_who_just_wrote_is_served_while_the_database_is_down(
        app: Any, client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis,
        settings: Settings) -> None:
    """The push window and the handoff check come from Redis for a person the webhook just accepted."""
    from shared.conversations import INBOUND, accept_inbound

    # Given a person whose text the webhook just accepted, and the bot known to the web process
    assert accept_inbound(redis, INBOUND.load({"sid": "SM" + "4" * 32, "bot_id": bot.id, "sender": PERSON,
                                               "to": bot.number, "body": "hola", "received_at": time.time()}))
    # When the database cannot be reached
    _cut_the_database(app, redis, bot, settings)

    pushed = client.post(callback(bot.id), headers=admin_headers, json={"recipient_id": PERSON, "text": "pensado"})

    # Then the push is queued all the same; someone the webhook never saw is a 503 to retry, not a 500
    assert (202, ["pensado"]) == (pushed.status_code, [reply["text"] for reply in outbox_of(redis, bot)])
    unknown = client.post(callback(bot.id), headers=admin_headers, json={"recipient_id": OTHER_PERSON, "text": "?"})
    assert 503 == unknown.status_code


def _cut_the_database(app: Any, redis: redis_lib.Redis, bot: Bot, settings: Settings) -> None:
    """The web process with its copies loaded (the handoffs', the bot in its cache), then no database."""
    from sqlalchemy import create_engine

    handoff.load_copy(get_engine(settings), redis, bot.id)
    with app.app_context():
        app.extensions["mammut"].bots.by_id(bot.id)
    app.extensions["mammut"].engine = create_engine("sqlite:////nonexistent/directory/mammut.sqlite3")


def test_a_wrote_mark_of_the_previous_release_still_opens_the_push_window_while_the_database_is_down(
        app: Any, client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis,
        settings: Settings) -> None:
    """A person's keys.wrote, as the release before issue 28 set it, counts until it expires."""
    # Given a person the previous release saw write an hour ago (its key, no mark of this release's)
    redis.set(keys.wrote(keys.conversation_id(bot.id, PERSON)), repr(time.time() - 3600), ex=47 * 3600)
    # When the engine pushes to them while the database cannot be reached
    _cut_the_database(app, redis, bot, settings)
    pushed = client.post(callback(bot.id), headers=admin_headers, json={"recipient_id": PERSON, "text": "pensado"})

    # Then Redis alone lets it through
    assert (202, ["pensado"]) == (pushed.status_code, [reply["text"] for reply in outbox_of(redis, bot)])


def test_an_erased_person_is_no_longer_known_to_have_written(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis) -> None:
    """An erase makes the conversation's marks forget when the person texted: the push window is shut,
    and a retry of the text they sent before is still a duplicate."""
    # Given a person who just wrote, then asked to be erased
    message = INBOUND.load({"sid": "SM" + "8" * 32, "bot_id": bot.id, "sender": PERSON, "to": bot.number,
                            "body": "hola", "received_at": time.time()})
    assert accept_inbound(redis, message)
    assert 200 == client.delete(f"{USERS}:{bot.id}/conversations/{PERSON}", headers=admin_headers).status_code

    # When the engine pushes to them, and Twilio retries their text
    pushed = client.post(callback(bot.id), headers=admin_headers, json={"recipient_id": PERSON, "text": "oferta"})
    retried = accept_inbound(redis, message)

    # Then the push is refused and the retry is not queued
    assert (403, [], False) == (pushed.status_code, outbox_of(redis, bot), retried)


def wrote(redis: redis_lib.Redis, bot: Bot, person: str, hours_ago: float, sid: str) -> None:
    """The webhook accepting a text of `person`'s, `hours_ago`."""
    assert accept_inbound(redis, INBOUND.load({"sid": sid, "bot_id": bot.id, "sender": person, "to": bot.number,
                                               "body": "hola", "received_at": time.time() - hours_ago * 3600}))


def test_a_push_window_of_one_day_refuses_a_person_whose_last_text_is_30_hours_old(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, store: BotStore, redis: redis_lib.Redis) -> None:
    """The webhook's mark of a text lives 48 hours, but a bot's push-window-days of 1 still ends after a day."""
    # Given a bot pushing within a day, a person who wrote 30 hours ago and another an hour ago
    short = store.update(bot.id, {"push-window-days": 1})
    wrote(redis, short, PERSON, 30, "SM" + "5" * 32)
    wrote(redis, short, OTHER_PERSON, 1, "SM" + "6" * 32)

    # When its engine pushes to each
    late = client.post(callback(short.id), headers=admin_headers, json={"recipient_id": PERSON, "text": "oferta"})
    recent = client.post(callback(short.id), headers=admin_headers, json={"recipient_id": OTHER_PERSON, "text": "oferta"})

    # Then only the one inside the day gets it
    assert (403, [PERSON]) == (late.status_code, late.json["errors"]["recipient_id"])
    assert 202 == recent.status_code
    assert ([], ["oferta"]) == ([r["text"] for r in outbox_of(redis, short)],
                                [r["text"] for r in outbox_of(redis, short, OTHER_PERSON)])


def test_a_push_to_a_person_a_human_has_is_refused_though_redis_lost_the_handoff_copy(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis,
        settings: Settings) -> None:
    """A handoff copy that is gone (a flush) says nothing: the push asks the database and is refused with 409."""
    # Given a person who just wrote and whom a human has taken over, and the handoffs' copy lost
    wrote(redis, bot, PERSON, 0, "SM" + "7" * 32)
    handoff.pause(get_engine(settings), redis, bot.id, PERSON, by="operator", timeout=0)
    redis.delete(keys.handoffs(bot.id))

    # When the engine pushes to them
    pushed = client.post(callback(bot.id), headers=admin_headers, json={"recipient_id": PERSON, "text": "oferta"})

    # Then nothing is queued
    assert (409, [PERSON]) == (pushed.status_code, pushed.json["errors"]["recipient_id"])
    assert [] == outbox_of(redis, bot)
