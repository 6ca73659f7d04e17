"""Human handoff: an operator (or the engine) hands a conversation to a human; the bot's engine is
not asked until it is given back, and the person's messages go, signed, to the bot's handoff-url."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis as redis_lib
from flask.testing import FlaskClient

from cli.twilio_standin import TwilioStandin
from shared import handoff, keys
from shared.bots import Bot, BotStore
from shared.conversations import INBOUND, accept_inbound
from shared.tasks import FORWARD_HANDOFF
from tests.support.fake_engine import FakeEngine
from tests.support.receiver import Receiver
from tests.test_crash_recovery import SENDER, bodies_to, engine_bot, send  # noqa: F401 (fixture)
from tests.test_outbound import wait_until

__all__ = ["engine_bot"]
USERS = "/app:mammut-1/graph/user"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture
def handed(client: FlaskClient, admin_headers: dict[str, str], engine_bot: Bot, receiver: Receiver,  # noqa: F811
           store: BotStore) -> tuple[Bot, str]:
    """The engine bot with a handoff-url, and the secret shown (once) when it was set."""
    response = client.post(f"{USERS}:{engine_bot.id}", headers=admin_headers, json={"handoff-url": receiver.url})
    assert 200 == response.status_code, response.json
    secret = response.json["taskResult"][0]["handoff-secret"]
    return store.get(engine_bot.id), secret


def path(bot: Bot, person: str = SENDER) -> str:
    return f"{USERS}:{bot.id}/conversations/{person}/handoff"


def logged(client: FlaskClient, admin_headers: dict[str, str], bot: Bot, person: str = SENDER) -> dict[str, Any]:
    return client.get(f"{USERS}:{bot.id}/messages?with={person.replace('+', '%2B')}", headers=admin_headers).json["data"]


def texts_in(log: dict[str, Any]) -> list[tuple[str, str]]:
    return [(entry["direction"], entry["text"]) for entry in log["messages"]]


def from_mammut(body: bytes, header: str, secret: str, now: float | None = None, tolerance: int = 300) -> bool:
    """The README's receiver check: a recent t, and a v1 that is the HMAC of "<t>." + body under `secret`."""
    pairs = [part.split("=", 1) for part in (header or "").split(",") if "=" in part]
    stamps = [value for name, value in pairs if name == "t"]
    if len(stamps) != 1 or not stamps[0].isdigit() or abs((now or time.time()) - int(stamps[0])) > tolerance:
        return False
    expected = hmac.new(secret.encode(), stamps[0].encode() + b"." + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, value) for name, value in pairs if name == "v1")


def verified(secret: str, received: Any) -> dict[str, Any]:
    """The forward's JSON, once its signature checks out as the README tells a receiver to check it."""
    assert from_mammut(received.body, received.headers["X-Mammut-Signature"], secret)
    return json.loads(received.body)


class TestPausedByTheOperator:
    def test_a_paused_conversation_reaches_the_human_not_the_engine_until_resumed(
            self, client: FlaskClient, admin_headers: dict[str, str], handed: tuple[Bot, str], redis: redis_lib.Redis,
            engine: FakeEngine, receiver: Receiver, twilio: TwilioStandin, worker: dramatiq.Worker,
            logs: list[dict[str, object]]) -> None:
        bot, secret = handed
        # Given the operator took the conversation over, with a note
        paused = client.post(path(bot), headers=admin_headers, json={"note": "Ana (support) has it"})
        assert 200 == paused.status_code
        assert (True, "operator", "Ana (support) has it") == (
            paused.json["data"]["handoff"]["paused"], paused.json["data"]["handoff"]["by"],
            paused.json["data"]["handoff"]["note"])

        # When the person writes
        send(redis, bot, "quiero hablar con alguien")

        # Then the human's tool gets it, signed, and the engine never does
        [forward] = receiver.wait_for(1)
        body = verified(secret, forward)
        assert (bot.id, SENDER, "quiero hablar con alguien", True, "Ana (support) has it") == (
            body["bot_id"], body["person"], body["text"], body["handoff"]["paused"], body["handoff"]["note"])
        assert body["message_sid"].startswith("SM") and body["message_sids"] == [body["message_sid"]]
        wait_until(lambda: [("in", "quiero hablar con alguien")] == texts_in(logged(client, admin_headers, bot)))
        assert [] == engine.calls and [] == twilio.messages
        # and the log and the conversation list say the conversation is paused, since when and why
        log = logged(client, admin_headers, bot)
        assert (True, "operator") == (log["handoff"]["paused"], log["handoff"]["by"])
        [listed] = client.get(f"{USERS}:{bot.id}/conversations", headers=admin_headers).json["data"]["conversations"]
        assert (SENDER, True, "Ana (support) has it") == (
            listed["person"], listed["handoff"]["paused"], listed["handoff"]["note"])
        assert listed["handoff"]["since"] <= time.time() <= listed["handoff"]["until"]

        # When the operator gives it back, the bot answers again
        resumed = client.delete(path(bot), headers=admin_headers)
        assert (200, True, False) == (resumed.status_code, resumed.json["data"]["resumed"],
                                      resumed.json["data"]["handoff"]["paused"])
        send(redis, bot, "gracias")
        twilio.wait_for(1, timeout=30)
        assert (["gracias"], ["reply to gracias"], 1) == (
            [call.text for call in engine.calls], bodies_to(twilio, SENDER), len(receiver.received))
        assert {"paused": False} == logged(client, admin_headers, bot)["handoff"]

    def test_a_pause_outlives_a_redis_flush(
            self, client: FlaskClient, admin_headers: dict[str, str], handed: tuple[Bot, str], redis: redis_lib.Redis,
            engine: FakeEngine, receiver: Receiver, worker: dramatiq.Worker) -> None:
        """The database is the record: a flushed Redis rebuilds its copy before the engine is asked."""
        bot, _ = handed
        client.post(path(bot), headers=admin_headers)
        redis.flushdb()
        send(redis, bot, "¿sigue ahí?")
        receiver.wait_for(1)
        assert [] == engine.calls

    def test_a_resume_the_copy_missed_is_found_in_the_database(
            self, client: FlaskClient, admin_headers: dict[str, str], handed: tuple[Bot, str], redis: redis_lib.Redis,
            engine: FakeEngine, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        """The copy is a hint: a pause it still lists but the record ended is not obeyed, and is dropped."""
        bot, _ = handed
        client.post(path(bot), headers=admin_headers)
        client.delete(path(bot), headers=admin_headers)
        redis.hset(keys.handoffs(bot.id), mapping={SENDER: "0", handoff.LOADED: "1"})  # as if the resume's HDEL was lost
        send(redis, bot, "hola")
        twilio.wait_for(1, timeout=30)
        assert ["hola"] == [call.text for call in engine.calls]
        assert not redis.hexists(keys.handoffs(bot.id), SENDER)

    def test_a_handoff_url_that_fails_costs_the_forward_not_the_message(
            self, client: FlaskClient, admin_headers: dict[str, str], handed: tuple[Bot, str], redis: redis_lib.Redis,
            engine: FakeEngine, receiver: Receiver, worker: dramatiq.Worker, logs: list[dict[str, object]],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """Retried like an engine call, then queued for a background try: the message is logged, and
        the next one handled."""
        monkeypatch.setattr("worker.engine.BACKOFF_SECONDS", (0.05, 0.05))
        bot, _ = handed
        receiver.status = 503
        client.post(path(bot), headers=admin_headers)
        send(redis, bot, "uno")
        send(redis, bot, "dos")
        wait_until(lambda: [("in", "uno"), ("in", "dos")] == texts_in(logged(client, admin_headers, bot)))
        wait_until(lambda: 6 == len(receiver.received))  # three tries each
        assert [] == engine.calls
        assert 2 == sum(event["event"] == "handoff_forward.queued" for event in logs)

    def test_pause_and_resume_refuse_bad_input_and_unknown_bots(
            self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot) -> None:
        assert 400 == client.post(path(bot, "not-a-number"), headers=admin_headers).status_code
        assert 400 == client.post(path(bot), headers=admin_headers, json={"note": 42}).status_code
        assert 400 == client.post(path(bot), headers=admin_headers, json={"note": "x" * 1001}).status_code
        assert 400 == client.post(path(bot), headers=admin_headers, data="{not json").status_code
        assert 404 == client.post(f"{USERS}:{bot.id + 100}/conversations/{SENDER}/handoff",
                                  headers=admin_headers).status_code
        assert 401 == client.post(path(bot)).status_code
        # Resuming a conversation that is not paused is harmless, and says so
        resumed = client.delete(path(bot), headers=admin_headers)
        assert (200, False) == (resumed.status_code, resumed.json["data"]["resumed"])


    def test_pausing_a_paused_conversation_keeps_its_since_takes_the_note_and_restarts_the_timeout(
            self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis,
            settings: object) -> None:
        """A new note, then an engine-requested handoff, while paused: `since` stays the first pause's."""
        from shared.db import get_engine

        first = client.post(path(bot), headers=admin_headers, json={"note": "primera"}).json["data"]["handoff"]
        time.sleep(0.05)
        again = client.post(path(bot), headers=admin_headers, json={"note": "segunda"}).json["data"]["handoff"]
        time.sleep(0.05)
        by_engine = handoff.pause(get_engine(settings), redis, bot.id, SENDER, by=handoff.BY_ENGINE,  # type: ignore[arg-type]
                                  timeout=86400, note="pidió un humano")
        shown = logged(client, admin_headers, bot)["handoff"]
        assert [first["since"]] * 3 == [again["since"], by_engine.since, shown["since"]]
        assert ("segunda", "pidió un humano", "engine") == (again["note"], shown["note"], shown["by"])
        assert first["until"] < again["until"] < shown["until"]


class TestPausedByTheEngine:
    def test_the_engine_hands_over_after_its_own_replies(
            self, client: FlaskClient, admin_headers: dict[str, str], handed: tuple[Bot, str], redis: redis_lib.Redis,
            engine: FakeEngine, receiver: Receiver, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        bot, secret = handed
        engine.answer = lambda payload: [
            {"recipient_id": payload["sender"], "text": "Te paso con una persona."},
            {"recipient_id": payload["sender"], "custom": {"handoff": True, "note": "pidió un humano"}},
        ]
        send(redis, bot, "humano por favor")
        twilio.wait_for(1, timeout=30)
        assert ["Te paso con una persona."] == bodies_to(twilio, SENDER)

        send(redis, bot, "hola?")
        [forward] = receiver.wait_for(1)
        assert ("hola?", "engine", "pidió un humano") == (
            verified(secret, forward)["text"], verified(secret, forward)["handoff"]["by"],
            verified(secret, forward)["handoff"]["note"])
        assert ["humano por favor"] == [call.text for call in engine.calls]
        assert (True, "engine") == (logged(client, admin_headers, bot)["handoff"]["paused"],
                                    logged(client, admin_headers, bot)["handoff"]["by"])

    def test_the_message_that_asked_for_the_handoff_is_still_answered_if_handled_again(
            self, handed: tuple[Bot, str], redis: redis_lib.Redis, engine: FakeEngine, twilio: TwilioStandin,
            settings: object, worker: dramatiq.Worker) -> None:
        """A worker that paused the conversation and died before queuing the replies: the next worker
        asks the engine again for that message (the pause names it), and the replies go out."""
        from shared.db import get_engine

        bot, _ = handed
        message = INBOUND.load({"sid": f"SM{time.time_ns():032x}", "bot_id": bot.id, "sender": SENDER,
                                "to": bot.number, "body": "humano", "received_at": time.time()})
        handoff.pause(get_engine(settings), redis, bot.id, SENDER, by=handoff.BY_ENGINE, timeout=3600,
                      message_sid=message["sid"])
        accept_inbound(redis, message)
        twilio.wait_for(1, timeout=30)
        assert (["humano"], ["reply to humano"]) == ([call.text for call in engine.calls], bodies_to(twilio, SENDER))


class TestTimeout:
    def test_a_paused_conversation_resumes_by_itself_after_the_bots_handoff_timeout(
            self, client: FlaskClient, admin_headers: dict[str, str], handed: tuple[Bot, str], redis: redis_lib.Redis,
            engine: FakeEngine, receiver: Receiver, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        bot, _ = handed
        client.post(f"{USERS}:{bot.id}", headers=admin_headers, json={"handoff-timeout": 1})
        paused = client.post(path(bot), headers=admin_headers).json["data"]["handoff"]
        assert paused["until"] == pytest.approx(paused["since"] + 1, abs=0.01)
        send(redis, bot, "antes")
        receiver.wait_for(1)
        time.sleep(1.1)
        assert {"paused": False} == logged(client, admin_headers, bot)["handoff"]
        send(redis, bot, "después")
        twilio.wait_for(1, timeout=30)
        assert ["después"] == [call.text for call in engine.calls]

    def test_a_timeout_of_zero_never_resumes(self, client: FlaskClient, admin_headers: dict[str, str],
                                             handed: tuple[Bot, str]) -> None:
        bot, _ = handed
        client.post(f"{USERS}:{bot.id}", headers=admin_headers, json={"handoff-timeout": 0})
        assert None is client.post(path(bot), headers=admin_headers).json["data"]["handoff"]["until"]


class TestRegistry:
    def test_the_handoff_secret_is_shown_once_when_the_url_is_set_and_never_again(
            self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot, store: BotStore) -> None:
        first = client.post(f"{USERS}:{bot.id}", headers=admin_headers, json={"handoff-url": "https://desk.example/h?key=k1"})
        secret = first.json["taskResult"][0]["handoff-secret"]
        assert secret.startswith("mshs_") and secret == store.get(bot.id).handoff_secret
        # A new URL keeps the secret (the human's tool still verifies), and shows nothing
        again = client.post(f"{USERS}:{bot.id}", headers=admin_headers, json={"handoff-url": "https://desk.example/h2"})
        assert "handoff-secret" not in again.json["taskResult"][0]
        shown = client.get(f"{USERS}:{bot.id}", headers=admin_headers).json["data"]["user"][0]
        assert ("https://desk.example/h2", 86400, 0) == (shown["handoff-url"], shown["handoff-timeout"],
                                                         shown["merge-window-ms"])
        assert secret not in json.dumps(shown)
        # Rotating makes a new one, shown once
        rotated = client.post(f"{USERS}:{bot.id}/handoff-secret", headers=admin_headers).json["taskResult"][0]
        assert rotated["handoff-secret"] != secret and rotated["handoff-secret"] == store.get(bot.id).handoff_secret
        # Unsetting the URL drops the secret; setting one again makes a new one
        client.post(f"{USERS}:{bot.id}", headers=admin_headers, json={"handoff-url": None})
        assert (None, None) == (store.get(bot.id).handoff_url, store.get(bot.id).handoff_secret)
        assert 409 == client.post(f"{USERS}:{bot.id}/handoff-secret", headers=admin_headers).status_code

    def test_a_handoff_url_on_create_is_answered_with_its_secret(
            self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore) -> None:
        created = client.post(USERS, headers=admin_headers, json={
            "user-type": "machine", "name": "b", "twilio-account-sid": "AC" + "1" * 32, "twilio-auth-token": "t" * 32,
            "main-phone-number": "+15005550011", "handoff-url": "https://desk.example/h", "merge-window-ms": 1500,
        }).json["taskResult"][0]
        bot = store.get(created["affectedElementId"])
        assert (created["handoff-secret"], 1500) == (bot.handoff_secret, bot.controls.merge_window_ms)

    def test_bad_handoff_settings_are_refused(self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot) -> None:
        for bad in ({"handoff-url": "ftp://desk.example/h"}, {"handoff-url": "https://u:p@desk.example/h"},
                    {"handoff-timeout": -1}, {"handoff-timeout": "soon"}, {"merge-window-ms": 60_001},
                    {"merge-window-ms": True}):
            response = client.post(f"{USERS}:{bot.id}", headers=admin_headers, json=bad)
            assert 400 == response.status_code, bad
            assert set(bad) <= set(response.json["errors"]), response.json

    def test_deleting_a_bot_forgets_its_pauses(self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot,
                                              redis: redis_lib.Redis, settings: object) -> None:
        from shared.db import get_engine

        client.post(path(bot), headers=admin_headers)
        client.delete(f"{USERS}:{bot.id}", headers=admin_headers)
        with get_engine(settings).connect() as connection:
            assert {} == handoff.active_of(connection, bot.id, [SENDER])
        assert not redis.exists(keys.handoffs(bot.id))


class TestWhoMayWriteWhilePaused:
    def test_the_engines_callback_is_refused_for_a_paused_person_and_the_operator_still_writes(
            self, client: FlaskClient, admin_headers: dict[str, str], handed: tuple[Bot, str], redis: redis_lib.Redis,
            twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        """The human answers through the operator's send; the engine's push would talk over them."""
        bot, _ = handed
        send(redis, bot, "hola")
        twilio.wait_for(1, timeout=30)
        wait_until(lambda: len(logged(client, admin_headers, bot)["messages"]) == 2)  # inside the push window
        client.post(path(bot), headers=admin_headers)

        pushed = client.post(f"/channels/sms/callback/{bot.id}", headers=admin_headers,
                             json={"recipient_id": SENDER, "text": "¿Algo más?"})
        assert (409, [SENDER]) == (pushed.status_code, pushed.json["errors"]["recipient_id"])

        human = client.post(f"{USERS}:{bot.id}/messages", headers=admin_headers,
                            json={"to": SENDER, "text": "Hola, soy Ana."})
        assert 202 == human.status_code
        twilio.wait_for(2, timeout=30)
        assert ["reply to hola", "Hola, soy Ana."] == bodies_to(twilio, SENDER)


def test_the_cli_pauses_and_resumes_a_conversation(live_server: str, bot: Bot, settings: object,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main
    from shared.db import get_engine
    from tests.conftest import ADMIN_TOKEN

    common = ["--url", live_server, "--token", ADMIN_TOKEN, "--bot", str(bot.id), "--with", SENDER]
    assert 0 == main(["handoff", "pause", *common, "--note", "Ana"])
    assert ("Ana", "operator") == (json.loads(capsys.readouterr().out)["handoff"]["note"], handoff_of(settings, bot)["by"])
    assert 0 == main(["handoff", "resume", *common])
    assert json.loads(capsys.readouterr().out)["resumed"]
    with get_engine(settings).connect() as connection:
        assert {} == handoff.active_of(connection, bot.id, [SENDER])
    assert 1 == main(["handoff", "pause", "--url", live_server, "--token", ADMIN_TOKEN, "--bot", str(bot.id),
                      "--with", "nope"])


def handoff_of(settings: object, bot: Bot) -> dict[str, Any]:
    from shared.db import get_engine

    with get_engine(settings).connect() as connection:
        return handoff.active_of(connection, bot.id, [SENDER])[SENDER].public()


def test_a_pause_redis_cannot_hear_is_not_recorded_either(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, settings: object,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The record and the copy never disagree the dangerous way (paused in the record, not in the
    copy the worker reads): with Redis down, the pause is undone and the caller told to try again."""
    from shared.db import get_engine

    client.post(path(bot), headers=admin_headers, json={"note": "first"})
    monkeypatch.setattr("webhook.handoffs.deps.get_redis", lambda: redis_lib.Redis(port=1, socket_connect_timeout=0.2))
    again = client.post(path(bot), headers=admin_headers, json={"note": "second"})
    other = client.post(path(bot, "+15551230009"), headers=admin_headers)
    assert (503, 503) == (again.status_code, other.status_code)
    with get_engine(settings).connect() as connection:
        kept = handoff.active_of(connection, bot.id, [SENDER, "+15551230009"])
    assert ([SENDER], "first") == (list(kept), kept[SENDER].note)


def test_erasing_a_conversation_ends_its_handoff(client: FlaskClient, admin_headers: dict[str, str], bot: Bot,
                                                 redis: redis_lib.Redis, settings: object) -> None:
    from shared.db import get_engine

    client.post(path(bot), headers=admin_headers, json={"note": "Ana has +15551230001"})
    assert 200 == client.delete(f"{USERS}:{bot.id}/conversations/{SENDER}", headers=admin_headers).status_code
    with get_engine(settings).connect() as connection:
        assert {} == handoff.active_of(connection, bot.id, [SENDER])
    assert not redis.hexists(keys.handoffs(bot.id), SENDER)


def test_a_handoff_url_inside_the_network_is_never_reached(handed: tuple[Bot, str], receiver: Receiver,
                                                            logs: list[dict[str, object]],
                                                            broker: dramatiq.Broker) -> None:
    """A bot's handoff-url is held to the engine's address policy: in production, loopback is refused
    before any connection (and not retried), like a bot's engine-url."""
    from shared.netguard import AddressPolicy
    from worker.handoff import Forwarder

    bot, _ = handed
    paused = handoff.Handoff(bot.id, SENDER, time.time(), None, handoff.BY_OPERATOR, None)
    message = {"sid": "SM" + "1" * 32, "sender": SENDER, "to": bot.number, "body": "hola", "media": [],
               "received_at": time.time()}
    assert not Forwarder(receiver.url, policy=AddressPolicy()).forward(bot, message, paused)
    assert [] == receiver.received
    assert ["refused_address"] == [event["outcome"] for event in logs if event["event"] == "handoff_forward.called"]
    # and it is not queued for later: an address that is refused now is refused then
    assert ["handoff_forward.gave_up"] == [event["event"] for event in logs if event["event"] in (
        "handoff_forward.queued", "handoff_forward.gave_up")]


def test_a_forward_the_handoff_url_did_not_take_is_tried_again_later(
        handed: tuple[Bot, str], receiver: Receiver, worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch,
        logs: list[dict[str, object]]) -> None:
    """A handoff-url that is down (503) past the inline retries gets the forward later, from the
    background, signed with the bot's secret; nothing is lost to a short outage."""
    from shared.netguard import AddressPolicy
    from worker import handoff as forwarding
    from worker.deps import get_settings

    bot, secret = handed
    monkeypatch.setattr(forwarding, "LATER_FIRST_DELAY_MS", 300)
    paused = handoff.Handoff(bot.id, SENDER, time.time(), None, handoff.BY_OPERATOR, "Ana")
    message = {"sid": "SM" + "2" * 32, "sender": SENDER, "to": bot.number, "body": "¿hola?", "media": [],
               "received_at": time.time()}
    # Given a handoff-url answering 503
    receiver.status = 503
    inline = forwarding.Forwarder(receiver.url, policy=AddressPolicy.for_settings(get_settings()),
                                  backoff=(0.05,)).forward(bot, message, paused)
    tried = len(receiver.received)
    # When it is back before the background try
    receiver.status = 200
    # Then the forward arrives once more, whole and signed, and is not queued again
    arrived = receiver.wait_for(tried + 1, timeout=15)
    assert (False, 2) == (inline, tried)
    assert ("¿hola?", "Ana") == (verified(secret, arrived[-1])["text"], verified(secret, arrived[-1])["handoff"]["note"])
    wait_until(lambda: any(event["event"] == "handoff_forward.delivered_later" for event in logs))
    assert ["handoff_forward.queued"] == [event["event"] for event in logs if event["event"] in (
        "handoff_forward.queued", "handoff_forward.gave_up")]


def _forward_now(bot: Bot, receiver: Receiver, sid: str, backoff: tuple[float, ...] = (0.05,)) -> bool:
    from shared.netguard import AddressPolicy
    from worker import handoff as forwarding
    from worker.deps import get_settings

    paused = handoff.Handoff(bot.id, SENDER, time.time(), None, handoff.BY_OPERATOR, None)
    message = {"sid": sid, "sender": SENDER, "to": bot.number, "body": "hola", "media": [], "received_at": time.time()}
    return forwarding.Forwarder(receiver.url, policy=AddressPolicy.for_settings(get_settings()),
                                backoff=backoff).forward(bot, message, paused)


class TestSignatures:
    def test_a_forward_signs_its_time_so_a_captured_one_is_refused_later(
            self, handed: tuple[Bot, str], receiver: Receiver, broker: dramatiq.Broker) -> None:
        """The receiver's check passes now, fails for the same request replayed after the 5-minute
        tolerance, and fails for a t moved forward to look recent."""
        bot, secret = handed
        assert _forward_now(bot, receiver, "SM" + "4" * 32)
        [forward] = receiver.received
        header = forward.headers["X-Mammut-Signature"]
        sent = int(header.split(",")[0].removeprefix("t="))

        assert from_mammut(forward.body, header, secret)
        assert not from_mammut(forward.body, header, secret, now=sent + 301)
        assert not from_mammut(forward.body, header.replace(f"t={sent}", f"t={sent + 301}"), secret, now=sent + 301)

    def test_after_a_rotation_forwards_carry_both_signatures_for_the_grace_period(
            self, client: FlaskClient, admin_headers: dict[str, str], handed: tuple[Bot, str], receiver: Receiver,
            store: BotStore, broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch) -> None:
        """A receiver still on the old secret and one already on the new both accept; once the grace
        period is over, only the new one does."""
        import shared.bots

        bot, old = handed
        new = client.post(f"{USERS}:{bot.id}/handoff-secret", headers=admin_headers).json["taskResult"][0][
            "handoff-secret"]
        assert _forward_now(store.get(bot.id), receiver, "SM" + "5" * 32)
        monkeypatch.setattr(shared.bots, "HANDOFF_SECRET_GRACE_SECONDS", 0)
        newest = client.post(f"{USERS}:{bot.id}/handoff-secret", headers=admin_headers).json["taskResult"][0][
            "handoff-secret"]
        assert _forward_now(store.get(bot.id), receiver, "SM" + "6" * 32)

        during, after = receiver.received
        signed = [[from_mammut(f.body, f.headers["X-Mammut-Signature"], s) for s in (old, new, newest)]
                  for f in (during, after)]
        assert [[True, True, False], [False, False, True]] == signed

    @pytest.mark.parametrize("status", [401, 403, 408, 425, 429])
    def test_a_receiver_refusing_the_signature_or_asking_for_time_gets_the_forward_later(
            self, handed: tuple[Bot, str], receiver: Receiver, worker: dramatiq.Worker,
            monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, object]], status: int) -> None:
        """Not gave_up: queued, and delivered once the receiver takes it (it switched secrets)."""
        from worker import handoff as forwarding

        bot, secret = handed
        monkeypatch.setattr(forwarding, "LATER_FIRST_DELAY_MS", 300)
        receiver.status = status
        assert not _forward_now(bot, receiver, "SM" + "7" * 32, backoff=())
        receiver.status = 200
        verified(secret, receiver.wait_for(2, timeout=15)[-1])
        assert ["handoff_forward.queued"] == [event["event"] for event in logs if event["event"] in (
            "handoff_forward.queued", "handoff_forward.gave_up")]

    def test_a_key_in_the_handoff_urls_path_never_reaches_the_log(
            self, handed: tuple[Bot, str], receiver: Receiver, broker: dramatiq.Broker,
            logs: list[dict[str, object]]) -> None:
        """A Slack-style handoff-url is logged with its ids and without its key, on every forward."""
        from shared.netguard import AddressPolicy
        from worker import handoff as forwarding
        from worker.deps import get_settings

        bot, _ = handed
        url = receiver.url + "/services/T0123ABCD/B0456EFGH/Zx9SecretAbcdefGhijklMnop"
        paused = handoff.Handoff(bot.id, SENDER, time.time(), None, handoff.BY_OPERATOR, None)
        message = {"sid": "SM" + "9" * 32, "sender": SENDER, "to": bot.number, "body": "hola", "media": [],
                   "received_at": time.time()}
        assert forwarding.Forwarder(url, policy=AddressPolicy.for_settings(get_settings())).forward(bot, message, paused)
        [called] = [event for event in logs if event["event"] == "handoff_forward.called"]
        assert str(called["url"]).endswith("/services/T0123ABCD/B0456EFGH/[redacted]")
        assert "Zx9Secret" not in json.dumps(logs, default=str)

    @pytest.mark.parametrize("status", [400, 404, 410, 422])
    def test_a_receiver_refusing_the_forward_itself_is_not_asked_again(
            self, handed: tuple[Bot, str], receiver: Receiver, broker: dramatiq.Broker,
            logs: list[dict[str, object]], status: int) -> None:
        """Any other 4xx: gave_up at once (it would be refused again), the text stays in the log."""
        bot, _ = handed
        receiver.status = status
        assert not _forward_now(bot, receiver, "SM" + "8" * 32)
        assert (1, ["handoff_forward.gave_up"]) == (len(receiver.received), [
            event["event"] for event in logs if event["event"] in ("handoff_forward.queued", "handoff_forward.gave_up")])


def test_a_forward_that_never_got_through_is_a_dead_letter_that_replays(
        handed: tuple[Bot, str], receiver: Receiver, worker: dramatiq.Worker, redis: redis_lib.Redis,
        broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of background tries, a forward lands in the dead-letter queue, listed with its bot, person
    and text; `dlq replay` sends it again."""
    from worker import handoff as forwarding
    from shared.dlq import list_dead_letters, replay

    bot, secret = handed
    monkeypatch.setitem(forwarding.forward_later.options, "max_retries", 0)
    paused = handoff.Handoff(bot.id, SENDER, time.time(), None, handoff.BY_OPERATOR, None)
    message = {"sid": "SM" + "3" * 32, "sender": SENDER, "to": bot.number, "body": "¿me oyen?", "media": [],
               "received_at": time.time()}
    # Given a handoff-url that stays down through the background try
    receiver.status = 503
    forwarding.forward_later.send(bot.id, forwarding.forward_payload(bot, message, paused))
    wait_until(lambda: bool(list_dead_letters(redis, broker)), timeout=30)
    [dead] = list_dead_letters(redis, broker)
    assert (bot.id, SENDER, "¿me oyen?", FORWARD_HANDOFF) == (dead["bot_id"], dead["to"], dead["text"],
                                                                        dead["reason"])
    # When it is back and the dead letter is replayed
    receiver.status = 200
    tried = len(receiver.received)
    assert [dead["id"]] == replay(redis, broker)
    # Then the forward arrives, and the dead-letter queue is empty
    arrived = receiver.wait_for(tried + 1)
    assert "¿me oyen?" == verified(secret, arrived[-1])["text"]
    assert [] == list_dead_letters(redis, broker)


def test_erasing_a_conversation_drops_its_forwards_waiting_for_later_and_its_dead_lettered_ones(
        handed: tuple[Bot, str], receiver: Receiver, worker: dramatiq.Worker, redis: redis_lib.Redis,
        broker: dramatiq.Broker, client: FlaskClient, admin_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        logs: list[dict[str, object]]) -> None:
    """A forward dead-lettered and one a worker holds for a later try, both of the person: after the
    erase neither is ever POSTed, and `dlq` has nothing left of them to replay."""
    from worker import handoff as forwarding
    from shared.dlq import list_dead_letters, replay

    bot, _ = handed
    monkeypatch.setitem(forwarding.forward_later.options, "max_retries", 0)
    paused = handoff.Handoff(bot.id, SENDER, time.time(), None, handoff.BY_OPERATOR, "private note")

    def payload(text: str) -> dict[str, Any]:
        message = {"sid": f"SM{time.time_ns():032x}", "sender": SENDER, "to": bot.number, "body": text, "media": [],
                   "received_at": time.time()}
        return forwarding.forward_payload(bot, message, paused)

    # Given a forward in the dead letters and one waiting 1.5 s for its next try
    receiver.status = 503
    forwarding.forward_later.send(bot.id, payload("dead"))
    wait_until(lambda: bool(list_dead_letters(redis, broker)), timeout=30)
    forwarding.forward_later.send_with_options(args=(bot.id, payload("later")), delay=1500)
    wait_until(lambda: redis.llen("dramatiq:outbound.DQ") == 0, what="the waiting forward in a worker's hands")
    tried = len(receiver.received)
    # When the conversation is erased and the handoff-url is back
    erased = client.delete(f"{USERS}:{bot.id}/conversations/{SENDER}", headers=admin_headers)
    receiver.status = 200
    # Then nothing of theirs is left to replay, and the waiting forward is dropped, not POSTed
    assert 200 == erased.status_code
    assert ([], []) == (list_dead_letters(redis, broker), replay(redis, broker))
    wait_until(lambda: any(event["event"] == "handoff_forward.dropped" for event in logs), timeout=15,
               what="the waiting forward dropped")
    time.sleep(0.5)
    assert tried == len(receiver.received)


def test_through_the_web_and_a_worker_process(worker_env: dict[str, str], redis: redis_lib.Redis, engine: FakeEngine,
                                              receiver: Receiver, twilio: TwilioStandin) -> None:
    """The whole path as deployed: the registry API and Twilio's signed webhook on the web process,
    the Procfile's worker answering, pausing and forwarding."""
    import requests
    from twilio.request_validator import RequestValidator

    from tests.conftest import ADMIN_TOKEN, BOT_ACCOUNT_SID, BOT_AUTH_TOKEN, free_port
    from tests.support.processes import start_web, start_worker

    twilio.reset()
    port = free_port()
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    web = start_web(worker_env, port)
    worker_process = start_worker(worker_env, processes=1, threads=4)
    try:
        created = requests.post(base + USERS, headers=headers, timeout=10, json={
            "user-type": "machine", "name": "desk", "twilio-account-sid": BOT_ACCOUNT_SID,
            "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": "+15005550020", "engine-url": engine.url,
            "messages-per-second": 50, "handoff-url": receiver.url}).json()["taskResult"][0]
        bot_id, secret = created["affectedElementId"], created["handoff-secret"]
        sent = 0

        def text(body: str) -> None:
            nonlocal sent
            sent += 1
            url = base + "/channels/sms/"
            form = {"MessageSid": f"SM{time.time_ns():024x}{sent:08d}", "AccountSid": BOT_ACCOUNT_SID, "From": SENDER,
                    "To": "+15005550020", "Body": body, "NumMedia": "0"}
            signature = RequestValidator(BOT_AUTH_TOKEN).compute_signature(url, form)
            assert 200 == requests.post(url, data=form, headers={"X-Twilio-Signature": signature}, timeout=10).status_code

        handoff_url = f"{base}{USERS}:{bot_id}/conversations/%2B15551230001/handoff"
        assert 200 == requests.post(handoff_url, headers=headers, json={"note": "Ana"}, timeout=10).status_code
        text("¿hay alguien?")
        [forward] = receiver.wait_for(1, timeout=30)
        assert ("¿hay alguien?", "Ana") == (verified(secret, forward)["text"], verified(secret, forward)["handoff"]["note"])
        assert 200 == requests.delete(handoff_url, headers=headers, timeout=10).status_code
        text("gracias")
        twilio.wait_for(1, timeout=30)
        assert (["gracias"], ["reply to gracias"]) == ([call.text for call in engine.calls], bodies_to(twilio, SENDER))
    finally:
        worker_process.stop(10)
        web.stop(10)
