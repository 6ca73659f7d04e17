"""Quiet hours and scheduled sends: what the person did not just ask for waits for its time (theirs,
or the one asked for) in the database, and goes out then, once, under the rules that stand then."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import dramatiq
import pytest
import redis as redis_lib
import requests
from flask.testing import FlaskClient

from cli.twilio_standin import TwilioStandin
from shared import handoff, keys, optout, schedule
from shared.bots import Bot, BotStore, Hours
from shared.db import get_engine, transaction
from shared.settings import Settings
from worker import scheduler
from worker.scheduler import run_due
from tests.conftest import free_port
from tests.support.processes import Process, ROOT, start_web, start_worker
from tests.test_flushall import (API, BOT_A, Service, bodies_to, private_redis, redis_server, service_env,
                                 wait_until)

__all__ = ["private_redis", "redis_server"]  # fixtures this module's tests use


def bot_with(quiet_hours: str | None, zone: str | None = None, number: str = "+15005550006") -> Bot:
    return Bot(id=1, name="b", account_sid="AC", auth_token="t", number=number, hours=Hours(quiet_hours, zone))


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# --- Quiet hours, on a fixed clock ------------------------------------------------------------

@pytest.mark.parametrize(("now", "expected"), [
    ("2026-12-24T23:00:00-06:00", "2026-12-25T08:00:00-06:00"),  # 23:00 in Mexico City: held till 8:00
    ("2026-12-25T03:30:00-06:00", "2026-12-25T08:00:00-06:00"),  # after midnight: till 8:00 the same day
    ("2026-12-24T20:59:00-06:00", None),
    ("2026-12-25T08:00:00-06:00", None),
])
def test_quiet_hours_across_midnight_in_the_recipients_zone(now: str, expected: str | None) -> None:
    """21:00-08:00 holds a message from 21:00 to 08:00 the next morning, the recipient's time."""
    bot = bot_with("21:00-08:00", "America/Mexico_City")
    assert (at(expected) if expected else None) == schedule.quiet_until(bot, "+5215512345678", at(now))


def test_the_same_moment_is_night_for_one_recipient_and_day_for_another() -> None:
    """At 05:00 UTC it is 00:00 in New York (held till 08:00 there) and 21:00 the day before in Los
    Angeles (held too), while it is 06:00 in Madrid's 07:00-22:00 day, and someone in Tokyo at 14:00 is not held."""
    bot = bot_with("21:00-08:00")
    now = at("2026-12-07T05:00:00+00:00")
    assert at("2026-12-07T08:00:00-05:00") == schedule.quiet_until(bot, "+12125550100", now)  # New York
    assert at("2026-12-07T08:00:00-08:00") == schedule.quiet_until(bot, "+14155550100", now)  # Los Angeles
    assert schedule.quiet_until(bot, "+81312345678", now) is None  # Tokyo, 14:00


def test_a_number_spanning_several_zones_takes_the_bots_and_a_set_zone_wins() -> None:
    """Spain's mobiles span Madrid and the Canaries: the bot's number's zone is used; quiet-hours-time-zone wins over both."""
    assert ZoneInfo("America/New_York") == schedule.recipient_zone(bot_with("21:00-08:00", number="+12125550199"),
                                                                   "+34600123456")
    assert ZoneInfo("Asia/Tokyo") == schedule.recipient_zone(bot_with("21:00-08:00", "Asia/Tokyo"), "+12125550100")
    assert ZoneInfo("America/New_York") == schedule.recipient_zone(bot_with("21:00-08:00"), "+12125550100")


def test_no_quiet_hours_holds_nothing() -> None:
    """A bot without quiet-hours sends at any hour."""
    assert schedule.quiet_until(bot_with(None), "+12125550100", at("2026-12-07T05:00:00+00:00")) is None


@pytest.mark.parametrize(("change", "field"), [
    ({"quiet-hours": "21:00-21:00"}, "quiet-hours"), ({"quiet-hours": "9pm-8am"}, "quiet-hours"),
    ({"quiet-hours": "24:00-08:00"}, "quiet-hours"), ({"quiet-hours-time-zone": "Mars/Olympus"}, "quiet-hours-time-zone"),
])
def test_bad_quiet_hours_are_a_400_naming_the_field(client: FlaskClient, admin_headers: dict[str, str], bot: Bot,
                                                     change: dict[str, Any], field: str) -> None:
    """quiet-hours is HH:MM-HH:MM and its zone an IANA name."""
    response = client.post(f"{API}:{bot.id}", headers=admin_headers, json=change)
    assert (400, [field]) == (response.status_code, list(response.get_json()["errors"]))


@pytest.mark.parametrize("send_at", ["2026-12-24T09:00:00", "tomorrow", "2020-01-01T00:00:00Z",
                                     (datetime.now(timezone.utc) + timedelta(days=31)).isoformat()])
def test_a_send_at_without_offset_past_or_beyond_30_days_is_a_400(client: FlaskClient, admin_headers: dict[str, str],
                                                                    bot: Bot, send_at: str) -> None:
    """send_at is RFC 3339 with its offset, no more than 30 days ahead."""
    response = client.post(f"{API}:{bot.id}/messages", headers=admin_headers,
                           json={"to": "+15551230001", "text": "hola", "send_at": send_at})
    assert 400 == response.status_code
    assert "send_at" in response.get_json()["errors"]


def test_a_scheduled_send_due_inside_quiet_hours_waits_for_their_end(
        settings: Settings, store: BotStore, bot: Bot, redis: redis_lib.Redis) -> None:
    """A send_at that falls in the recipient's night is not sent then: it waits, as held, for the morning."""
    # Given a send due now, to a person for whom it is 23:00
    sql = get_engine(settings)
    night = store.update(bot.id, {"quiet-hours": "21:00-08:00", "quiet-hours-time-zone": "America/Mexico_City"})
    now = at("2026-12-24T23:00:00-06:00")
    with transaction(sql) as connection:
        scheduled_id = schedule.add(connection, night.id, "+5215512345678", "feliz navidad", None, "operator",
                                    now - 1, schedule.SEND_AT)

    # When the scheduler looks at what is due
    queued = run_due(redis, sql, store.get, now=now)

    # Then nothing is queued, and the message waits for 08:00 the recipient's time
    with sql.connect() as connection:
        item = schedule.read(connection, night.id, scheduled_id)
    assert item is not None
    assert (0, "waiting", "quiet-hours", at("2026-12-25T08:00:00-06:00")) == (queued, item.state, item.reason,
                                                                              item.send_at)
    assert 0 == redis.zcard(keys.PENDING)


def test_a_scheduled_push_to_a_person_who_went_quiet_meanwhile_is_dropped_at_its_time(
        settings: Settings, store: BotStore, bot: Bot, redis: redis_lib.Redis, broker: dramatiq.Broker) -> None:
    """The push window is the bot's as it stands when the push comes due, not when it was scheduled."""
    sql = get_engine(settings)
    with transaction(sql) as connection:
        pushed = schedule.add(connection, bot.id, "+15551140010", "¿sigues ahí?", None, "callback", time.time() - 1,
                              schedule.SEND_AT)
        written = schedule.add(connection, bot.id, "+15551140011", "hola", None, "operator", time.time() - 1,
                               schedule.SEND_AT)
    assert 1 == run_due(redis, sql, store.get)
    with sql.connect() as connection:
        states = [getattr(schedule.read(connection, bot.id, item), "state", None) for item in (pushed, written)]
    assert ["outside-window", "queued"] == states


def test_a_pass_that_dies_before_its_database_commit_leaves_it_waiting_and_the_next_queues_nothing_twice(
        settings: Settings, store: BotStore, bot: Bot, redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Redis step that queues a due message marks it: a worker that dies before committing
    leaves it waiting in the database, and the pass that takes it again does not queue it again."""
    # Given a message due now
    sql = get_engine(settings)
    person = "+15551140009"
    with transaction(sql) as connection:
        scheduled_id = schedule.add(connection, bot.id, person, "una vez", None, "operator", time.time() - 1,
                                    schedule.SEND_AT)

    # When a pass queues it and then fails before its commit
    class DiesAfterQueuing:
        """The scheduler's log, failing at the line written right after the Redis step, before the commit."""

        def info(self, event: str, **_: Any) -> None:
            if event == "scheduled.queued":
                raise RuntimeError("the worker died here")

    monkeypatch.setattr(scheduler, "log", DiesAfterQueuing())
    with pytest.raises(RuntimeError):
        run_due(redis, sql, store.get)
    with sql.connect() as connection:
        assert "waiting" == getattr(schedule.read(connection, bot.id, scheduled_id), "state", None)
    monkeypatch.undo()
    run_due(redis, sql, store.get)

    # Then it is queued once, and recorded as queued
    assert [f"{scheduled_id}-0"] == redis.lrange(keys.outbox(keys.conversation_id(bot.id, person)), 0, -1)
    with sql.connect() as connection:
        assert "queued" == getattr(schedule.read(connection, bot.id, scheduled_id), "state", None)



def test_at_its_time_an_engines_push_to_a_handed_off_person_is_dropped_and_an_operators_send_goes(
        settings: Settings, store: BotStore, bot: Bot, redis: redis_lib.Redis, broker: dramatiq.Broker) -> None:
    """A human took the conversation over after the push was scheduled: the engine's push is dropped
    (handed-off) when it comes due, while the operator's own send still goes."""
    # Given a push and an operator's send, both due now, to a person a human has since taken over
    sql = get_engine(settings)
    person = "+15551140012"
    with transaction(sql) as connection:
        pushed = schedule.add(connection, bot.id, person, "oferta", None, "callback", time.time() - 1, schedule.SEND_AT)
        written = schedule.add(connection, bot.id, person, "te atiende Ana", None, "operator", time.time() - 1,
                               schedule.SEND_AT)
    handoff.pause(sql, redis, bot.id, person, by="operator", timeout=0)

    # When the scheduler looks at what is due
    queued = run_due(redis, sql, store.get)

    # Then only the operator's send is queued
    with sql.connect() as connection:
        states = [getattr(schedule.read(connection, bot.id, item), "state", None) for item in (pushed, written)]
    assert (1, ["handed-off", "queued"]) == (queued, states)
    assert [f"{written}-0"] == redis.lrange(keys.outbox(keys.conversation_id(bot.id, person)), 0, -1)


def test_a_scheduled_send_obeys_an_opt_out_of_the_pool_number_the_person_texted(
        settings: Settings, store: BotStore, bot: Bot, redis: redis_lib.Redis, broker: dramatiq.Broker) -> None:
    """A bot with several numbers answers from the one the person texted: their STOP to that number
    (not the bot's main one) keeps a scheduled send from them."""
    # Given a person who texted the bot's second number and then opted out of it
    sql = get_engine(settings)
    pool_number, person = "+15550012077", "+15551140013"
    pooled = store.update(bot.id, {"phone-numbers": [pool_number]})
    redis.set(keys.texted(keys.conversation_id(pooled.id, person)), pool_number)
    optout.opt_out(sql, redis, pool_number, person)
    with transaction(sql) as connection:
        scheduled_id = schedule.add(connection, pooled.id, person, "recordatorio", None, "operator", time.time() - 1,
                                    schedule.SEND_AT)

    # When it comes due
    queued = run_due(redis, sql, store.get)

    # Then nothing is queued for them
    with sql.connect() as connection:
        state = getattr(schedule.read(connection, pooled.id, scheduled_id), "state", None)
    assert (0, "opted-out") == (queued, state)
    assert 0 == redis.llen(keys.outbox(keys.conversation_id(pooled.id, person)))


@pytest.mark.parametrize(("minutes_ago", "status"), [(2, 202), (60, 400)])
def test_a_send_at_a_few_minutes_past_is_now_and_an_hour_past_is_a_400(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, minutes_ago: int, status: int) -> None:
    """Clocks differ, so a send_at up to 5 minutes past is taken as now; one an hour past is a mistake."""
    send_at = (datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)).isoformat()
    response = client.post(f"{API}:{bot.id}/messages", headers=admin_headers,
                           json={"to": "+15551230001", "text": "hola", "send_at": send_at})
    assert status == response.status_code, response.get_data(as_text=True)
    if status == 202:
        data = response.get_json()["data"]
        assert (1, []) == (len(data["queued"]), data.get("scheduled", []))


# --- Through the Procfile's web and worker ----------------------------------------------------

class Deployment(Service):
    """The web process and a worker process that a test can kill and start again."""

    def __init__(self, port: int, env: dict[str, str]) -> None:
        super().__init__(port, env)
        self.worker: Process | None = None

    def start_worker(self) -> None:
        self.worker = start_worker(self.env, processes=1, threads=4)

    def kill_worker(self) -> None:
        assert self.worker is not None
        self.worker.kill()

    def update(self, bot_id: int, fields: dict[str, Any]) -> None:
        response = requests.post(f"{self.base}{API}:{bot_id}", headers=self.headers, json=fields, timeout=10)
        assert 200 == response.status_code, response.text

    def send(self, bot_id: int, to: str, text: str, send_at: str | None = None) -> requests.Response:
        return requests.post(f"{self.base}{API}:{bot_id}/messages", headers=self.headers, timeout=10,
                             json={"to": to, "text": text, **({"send_at": send_at} if send_at else {})})

    def scheduled(self, bot_id: int) -> list[dict[str, Any]]:
        response = requests.get(f"{self.base}{API}:{bot_id}/scheduled", headers=self.headers, timeout=10)
        assert 200 == response.status_code, response.text
        return response.json()["data"]["scheduled"]

    def metrics(self) -> str:
        return requests.get(f"{self.base}/metrics", headers=self.headers, timeout=10).text


@pytest.fixture
def deployment(worker_env: dict[str, str], private_redis: redis_lib.Redis, database: str,
               twilio: TwilioStandin) -> Iterator[Deployment]:
    twilio.reset()
    port = free_port()
    env = service_env(worker_env, private_redis, port)
    web = start_web(env, port)
    deployed = Deployment(port, env)
    try:
        deployed.start_worker()
        yield deployed
    finally:
        if deployed.worker is not None:
            deployed.worker.stop(10)
        web.stop(10)


def rfc3339_in(seconds: float) -> str:
    return (datetime.now(ZoneInfo("America/Mexico_City")) + timedelta(seconds=seconds)).isoformat()


TALKER, LATER, CANCELLED, QUITTER = "+15551140001", "+15551140002", "+15551140003", "+15551140004"


def test_scheduled_sends_survive_a_killed_worker_and_a_flushed_redis_and_go_once_cancelled_and_opted_out_never(
        deployment: Deployment, private_redis: redis_lib.Redis, twilio: TwilioStandin) -> None:
    """A send_at survives the worker's SIGKILL and Redis's FLUSHALL and goes out once at its time;
    one cancelled never goes; one to a person who opts out before it is due is never sent."""
    bot_id = deployment.register(BOT_A)
    assert 200 == deployment.text(BOT_A, QUITTER, "hola")  # a person who talked, then opts out
    wait_until(lambda: bodies_to(twilio, QUITTER), what="the first answer")

    # Given three sends scheduled 20 s ahead, by the API and by `mammut-sms send --at`
    when = rfc3339_in(20)
    kept = deployment.send(bot_id, LATER, "recordatorio", when)
    assert 202 == kept.status_code, kept.text
    [scheduled] = kept.json()["data"]["scheduled"]
    cli = subprocess.run([sys.executable, "-m", "cli.main", "send", "--bot", str(bot_id), "--to", CANCELLED,
                          "--at", when, "--url", deployment.base, "--token", deployment.headers["Authorization"][7:],
                          "no debe llegar"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert 0 == cli.returncode, cli.stderr
    assert 202 == deployment.send(bot_id, QUITTER, "tampoco", when).status_code
    listed = {item["to"]: item for item in deployment.scheduled(bot_id)}
    assert {"waiting"} == {listed[person]["state"] for person in (LATER, CANCELLED, QUITTER)}
    assert (scheduled["id"], "send-at") == (listed[LATER]["id"], listed[LATER]["reason"])

    # When one is cancelled, one person opts out, the worker is killed and Redis loses everything
    cancel = requests.delete(f"{deployment.base}{API}:{bot_id}/scheduled/{listed[CANCELLED]['id']}",
                             headers=deployment.headers, timeout=10)
    assert 200 == cancel.status_code, cancel.text
    assert 409 == requests.delete(f"{deployment.base}{API}:{bot_id}/scheduled/{listed[CANCELLED]['id']}",
                                  headers=deployment.headers, timeout=10).status_code
    assert 200 == deployment.text(BOT_A, QUITTER, "STOP")
    wait_until(lambda: any(entry["text"] == "STOP" for entry in deployment.log(bot_id, QUITTER)),
               what="the opt-out handled")
    deployment.kill_worker()
    private_redis.flushall()
    deployment.start_worker()

    # Then at its time the kept one goes out once, and the other two never
    wait_until(lambda: bodies_to(twilio, LATER), timeout=90, what="the scheduled send")
    states = wait_until(lambda: (lambda s: s if "waiting" not in s.values() else None)(
        {item["to"]: item["state"] for item in deployment.scheduled(bot_id)}), timeout=30, what="every one settled")
    assert {LATER: "queued", CANCELLED: "cancelled", QUITTER: "opted-out"} == states
    time.sleep(3)  # a second pass, had it queued anything again, would have sent it by now
    assert (["recordatorio"], [], ["echo: hola"]) == (bodies_to(twilio, LATER), bodies_to(twilio, CANCELLED),
                                                      bodies_to(twilio, QUITTER))
    assert ["out"] == [entry["direction"] for entry in deployment.log(bot_id, LATER)]


def test_at_night_pushes_and_operator_sends_wait_in_order_while_replies_go_and_all_survive_a_flush(
        deployment: Deployment, private_redis: redis_lib.Redis, twilio: TwilioStandin) -> None:
    """Inside quiet hours a person's own text is answered at once; an engine's push and an
    operator's send are held (listed by the API, counted in /metrics, kept through a Redis flush
    and a killed worker) and go out when the hours end, in the order they came."""
    # Given a bot whose quiet hours (in UTC) end at the next minute but one, so it is night now
    now = datetime.now(timezone.utc)
    ends = (now + timedelta(minutes=1 if now.second < 40 else 2)).replace(second=0, microsecond=0)
    start = now - timedelta(hours=2)
    bot_id = deployment.register(BOT_A)
    deployment.update(bot_id, {"quiet-hours": f"{start:%H:%M}-{ends:%H:%M}", "quiet-hours-time-zone": "UTC"})
    token = requests.post(f"{deployment.base}{API}:{bot_id}/engine-token", headers=deployment.headers,
                          timeout=10).json()["taskResult"][0]["engine-token"]

    # When the person texts, then the engine pushes and an operator writes
    assert 200 == deployment.text(BOT_A, TALKER, "¿abren mañana?")
    wait_until(lambda: bodies_to(twilio, TALKER), what="the reply to their own text")
    # (the push window reads the log, which trails the work by a moment)
    wait_until(lambda: deployment.log(bot_id, TALKER), what="their text in the log")
    pushed = requests.post(f"{deployment.base}/channels/sms/callback/{bot_id}", timeout=10,
                           headers={"Authorization": f"Bearer {token}"},
                           json=[{"recipient_id": TALKER, "text": "oferta 1"}, {"recipient_id": TALKER, "text": "oferta 2"}])
    assert (202, 0) == (pushed.status_code, pushed.json()["data"]["queued"]), pushed.text
    assert 202 == deployment.send(bot_id, TALKER, "mensaje del equipo").status_code

    # Then the reply went at once and the rest wait, visibly
    assert ["echo: ¿abren mañana?"] == bodies_to(twilio, TALKER)
    held = deployment.scheduled(bot_id)
    assert [("oferta 1", "quiet-hours", "waiting"), ("oferta 2", "quiet-hours", "waiting"),
            ("mensaje del equipo", "quiet-hours", "waiting")] == [(i["text"], i["reason"], i["state"]) for i in held]
    assert {ends.timestamp()} == {item["send-at"] for item in held}
    wait_until(lambda: 'sms_scheduled_waiting{queue="quiet-hours"} 3.0' in deployment.metrics(), what="the gauge")
    # and a killed worker and a flushed Redis lose none of them
    deployment.kill_worker()
    private_redis.flushall()
    deployment.start_worker()
    assert ["echo: ¿abren mañana?"] == bodies_to(twilio, TALKER)
    wait_until(lambda: len(bodies_to(twilio, TALKER)) == 4, timeout=150, what="the held messages after the hours")
    assert ["echo: ¿abren mañana?", "oferta 1", "oferta 2", "mensaje del equipo"] == bodies_to(twilio, TALKER)
    assert all(message.received_at >= ends.timestamp() for message in twilio.messages[1:])
