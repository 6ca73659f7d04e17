"""Messaging Services and number pools: a bot answers on several numbers or through a Twilio
Messaging Service, replies from the number the person texted, and handles what a service reports late.

Twilio's behaviour these tests rely on is in ../shared/reference/messaging-services.md: a service send
starts `accepted`, a service picks (and keeps) a sender per recipient, and a full queue (30001) or an
opt-out (21610) arrive as status callbacks rather than as the create's answer.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis as redis_lib
from flask.testing import FlaskClient
from sqlalchemy import select

from cli.twilio_standin import SentMessage, TwilioStandin
from shared import keys, messagelog, optout
from shared.bots import Bot, BotStore
from shared.schema import deliveries, messages
from shared.settings import get_settings
from shared.twilio_errors import BACKOFF, Action
from tests.conftest import ADMIN_TOKEN, BOT_ACCOUNT_SID, BOT_AUTH_TOKEN
from tests.support.carrier import carrying
from tests.support.messagelog import log_written
from tests.test_outbound import send as send_as_engine
from tests.test_outbound import sql, wait_until
from tests.test_signature import inbound_params, post_signed

USERS = "/app:mammut-1/graph/user"
MAIN, POOL_A, POOL_B, UNLISTED = "+15550012001", "+15550012002", "+15550012003", "+15550012009"
ALICE, BOB = "+15551110001", "+15551110002"
STATUS_PATH = "/channels/sms/status"


def service_sid() -> str:
    return "MG" + uuid.uuid4().hex


def bot_fields(**extra: Any) -> dict[str, Any]:
    return {"user-type": "machine", "name": "pool bot", "twilio-account-sid": BOT_ACCOUNT_SID,
            "twilio-auth-token": BOT_AUTH_TOKEN, **extra}


def make_bot(store: BotStore, **extra: Any) -> Bot:
    fields = {"messages-per-second": 50.0, **bot_fields(**extra)}
    fields.pop("user-type")
    return store.create(fields)


def shown(client: FlaskClient, admin_headers: dict[str, str], bot_id: int) -> dict[str, Any]:
    return client.get(f"{USERS}:{bot_id}", headers=admin_headers).json["data"]["user"][0]


def text(client: FlaskClient, to: str, sender: str = ALICE, **extra: str) -> Any:
    """A person's SMS, as Twilio posts it (signed with the bot's token)."""
    return post_signed(client, inbound_params(To=to, From=sender, **extra))


def sent_to(twilio: TwilioStandin, person: str) -> list[SentMessage]:
    return [message for message in twilio.messages if message.to == person]


class TestRegistry:
    """The registry takes a messaging service, further numbers and send options, by JSON and query string."""

    def test_a_bot_with_only_a_messaging_service_is_registered_and_shown(
            self, client: FlaskClient, admin_headers: dict[str, str], database: str) -> None:
        """No main-phone-number is needed with a service; GET shows every new field."""
        service = service_sid()
        created = client.post(USERS, headers=admin_headers, json=bot_fields(**{
            "twilio-messaging-service-sid": service, "phone-numbers": [POOL_A, "+1 (555) 001-2003"],
            "validity-period": 600, "smart-encoded": True, "shorten-urls": True}))
        assert 200 == created.status_code, created.json
        bot = shown(client, admin_headers, created.json["taskResult"][0]["affectedElementId"])
        assert (None, service, [POOL_A, POOL_B], 600, True, True) == (
            bot["main-phone-number"], bot["twilio-messaging-service-sid"], bot["phone-numbers"],
            bot["validity-period"], bot["smart-encoded"], bot["shorten-urls"])

    def test_a_bot_needs_a_number_or_a_messaging_service(self, client: FlaskClient, admin_headers: dict[str, str],
                                                          database: str) -> None:
        """Neither: 400 naming main-phone-number. The seed's payload (a number, nothing new) still works."""
        refused = client.post(USERS, headers=admin_headers, json=bot_fields())
        seed = client.post(USERS, headers=admin_headers, json=bot_fields(**{"main-phone-number": MAIN}))
        assert (400, ["main-phone-number"]) == (refused.status_code, list(refused.json["errors"]))
        assert 200 == seed.status_code
        assert ([], None, None, None) == tuple(shown(client, admin_headers, 1)[name] for name in (
            "phone-numbers", "twilio-messaging-service-sid", "validity-period", "smart-encoded"))

    @pytest.mark.parametrize(("field", "value"), [
        ("twilio-messaging-service-sid", "MG123"),
        ("twilio-messaging-service-sid", "AC" + "0" * 32),
        ("phone-numbers", ["+15550012002", "12"]),
        ("phone-numbers", {"a": 1}),
        ("validity-period", 0),
        ("validity-period", 36_001),
        ("smart-encoded", "maybe"),
    ])
    def test_malformed_fields_are_400_naming_the_field(self, client: FlaskClient, admin_headers: dict[str, str],
                                                      database: str, field: str, value: Any) -> None:
        response = client.post(USERS, headers=admin_headers, json=bot_fields(**{"main-phone-number": MAIN, field: value}))
        assert (400, [field]) == (response.status_code, list(response.json["errors"]))

    def test_shorten_urls_needs_a_messaging_service(self, client: FlaskClient, admin_headers: dict[str, str],
                                                   database: str) -> None:
        """Twilio shortens links only for service sends: without one, 400 naming shorten-urls."""
        response = client.post(USERS, headers=admin_headers,
                               json=bot_fields(**{"main-phone-number": MAIN, "shorten-urls": True}))
        assert (400, ["shorten-urls"]) == (response.status_code, list(response.json["errors"]))

    @pytest.mark.parametrize(("first", "second"), [
        ({"main-phone-number": MAIN}, {"main-phone-number": POOL_B, "phone-numbers": [MAIN]}),
        ({"main-phone-number": MAIN, "phone-numbers": [POOL_A]}, {"main-phone-number": POOL_A}),
        ({"main-phone-number": MAIN, "phone-numbers": [POOL_A]}, {"main-phone-number": POOL_B, "phone-numbers": [POOL_A]}),
    ], ids=["pool-number-is-another-bots-main", "main-is-another-bots-pool-number", "pool-number-in-two-pools"])
    def test_a_number_belongs_to_one_bot_across_main_and_pool_numbers(
            self, client: FlaskClient, admin_headers: dict[str, str], database: str,
            first: dict[str, Any], second: dict[str, Any]) -> None:
        """409 naming the number and the bot that has it; nothing of the second bot is stored."""
        assert 200 == client.post(USERS, headers=admin_headers, json=bot_fields(**first)).status_code
        refused = client.post(USERS, headers=admin_headers, json=bot_fields(**second))
        taken = MAIN if MAIN in json.dumps(second) else POOL_A
        assert 409 == refused.status_code
        assert f"{taken} already belongs to bot 1" == refused.json["message"]
        assert 1 == len(client.get(USERS, headers=admin_headers).json["data"]["user"])

    def test_a_messaging_service_belongs_to_one_bot(self, client: FlaskClient, admin_headers: dict[str, str],
                                                   database: str) -> None:
        service = service_sid()
        client.post(USERS, headers=admin_headers, json=bot_fields(**{"twilio-messaging-service-sid": service}))
        refused = client.post(USERS, headers=admin_headers, json=bot_fields(**{"twilio-messaging-service-sid": service}))
        assert (409, ["twilio-messaging-service-sid"]) == (refused.status_code, list(refused.json["errors"]))
        assert f"{service} already belongs to bot 1" == refused.json["message"]

    def test_a_messaging_service_sid_differing_only_in_case_is_the_same_service(
            self, client: FlaskClient, admin_headers: dict[str, str], database: str) -> None:
        """A SID's hex has no case: MG + 32 x C and MG + 32 x c name one service, which one bot has."""
        first = client.post(USERS, headers=admin_headers, json=bot_fields(**{"twilio-messaging-service-sid": "MG" + "C" * 32}))
        second = client.post(USERS, headers=admin_headers, json=bot_fields(**{"twilio-messaging-service-sid": "MG" + "c" * 32}))
        assert (200, 409, ["twilio-messaging-service-sid"]) == (
            first.status_code, second.status_code, list(second.json["errors"]))

    def test_update_by_the_seeds_quoted_query_string(self, client: FlaskClient, admin_headers: dict[str, str],
                                                    database: str) -> None:
        """phone-numbers comma-separated with raw '+', quoted values, as the seed's update is written."""
        client.post(USERS, headers=admin_headers, json=bot_fields(**{"main-phone-number": MAIN}))
        service = service_sid()
        query = (f'twilio-messaging-service-sid="{service}"&phone-numbers="{POOL_A},{POOL_B}"'
                 '&validity-period="120"&smart-encoded="true"&shorten-urls="false"')
        response = client.post(f"{USERS}:1?{query}", headers=admin_headers)
        assert 200 == response.status_code, response.json
        bot = shown(client, admin_headers, 1)
        assert (MAIN, service, [POOL_A, POOL_B], 120, True, False) == (
            bot["main-phone-number"], bot["twilio-messaging-service-sid"], bot["phone-numbers"],
            bot["validity-period"], bot["smart-encoded"], bot["shorten-urls"])

    def test_a_number_removed_from_a_pool_is_free_again(self, client: FlaskClient, admin_headers: dict[str, str],
                                                       database: str) -> None:
        """Updating phone-numbers replaces the pool: a number it drops can go to another bot; null clears it."""
        client.post(USERS, headers=admin_headers, json=bot_fields(**{"main-phone-number": MAIN,
                                                                    "phone-numbers": [POOL_A, POOL_B]}))
        assert 200 == client.post(f"{USERS}:1", headers=admin_headers, json={"phone-numbers": [POOL_B]}).status_code
        other = client.post(USERS, headers=admin_headers, json=bot_fields(**{"main-phone-number": POOL_A}))
        assert 200 == other.status_code
        client.post(f"{USERS}:1", headers=admin_headers, json={"phone-numbers": None})
        assert [] == shown(client, admin_headers, 1)["phone-numbers"]

    def test_a_late_status_callback_does_not_give_a_removed_number_back(
            self, client: FlaskClient, admin_headers: dict[str, str], database: str) -> None:
        """The service sent from POOL_B; the operator takes POOL_B off the bot; a callback about that earlier
        send ("delivered", up to days later, to any web process) must not make POOL_B the bot's again,
        or no other bot could ever be given it."""
        from shared.poolnumbers import POOL_NUMBERS

        service = service_sid()
        assert 200 == client.post(USERS, headers=admin_headers, json=bot_fields(**{
            "twilio-messaging-service-sid": service, "phone-numbers": [POOL_A, POOL_B]})).status_code
        sid = "SM" + uuid.uuid4().hex
        status = {"MessageSid": sid, "AccountSid": BOT_ACCOUNT_SID, "From": POOL_B, "To": ALICE,
                  "MessagingServiceSid": service, "ApiVersion": "2010-04-01"}
        assert 200 == post_signed(client, {**status, "MessageStatus": "sent"}, path="/channels/sms/status").status_code
        assert 200 == client.post(f"{USERS}:1", headers=admin_headers, json={"phone-numbers": [POOL_A]}).status_code

        POOL_NUMBERS.forget()  # the late callback reaches a process that never learnt POOL_B
        assert 200 == post_signed(client, {**status, "MessageStatus": "delivered"},
                                  path="/channels/sms/status").status_code

        other = client.post(USERS, headers=admin_headers, json=bot_fields(**{"main-phone-number": POOL_B}))
        assert 200 == other.status_code, other.json

    def test_a_bot_cannot_be_left_without_a_way_to_send(self, client: FlaskClient, admin_headers: dict[str, str],
                                                       database: str) -> None:
        """Unsetting the service of a bot that has no number conflicts with its other fields (409), and changes nothing."""
        service = service_sid()
        client.post(USERS, headers=admin_headers, json=bot_fields(**{"twilio-messaging-service-sid": service}))
        response = client.post(f"{USERS}:1", headers=admin_headers, json={"twilio-messaging-service-sid": None})
        assert (409, ["main-phone-number"]) == (response.status_code, list(response.json["errors"]))
        assert service == shown(client, admin_headers, 1)["twilio-messaging-service-sid"]

    def test_the_cli_creates_and_updates_a_pooled_bot(self, live_server: str, capsys: pytest.CaptureFixture[str],
                                                     client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """`mammut-sms bots create --messaging-service-sid ... --phone-numbers a,b` then `update --validity-period`."""
        from cli.main import main

        service = service_sid()
        auth = ["--url", live_server, "--token", ADMIN_TOKEN]
        assert 0 == main(["bots", "create", *auth, "--name", "pool", "--account-sid", BOT_ACCOUNT_SID,
                          "--auth-token", BOT_AUTH_TOKEN, "--messaging-service-sid", service,
                          "--phone-numbers", f"{POOL_A},{POOL_B}", "--smart-encoded", "true"])
        assert 0 == main(["bots", "update", "1", *auth, "--validity-period", "900", "--shorten-urls", "true"])
        capsys.readouterr()
        bot = shown(client, admin_headers, 1)
        assert (service, [POOL_A, POOL_B], 900, True, True) == (
            bot["twilio-messaging-service-sid"], bot["phone-numbers"], bot["validity-period"], bot["smart-encoded"],
            bot["shorten-urls"])


class TestInbound:
    """A message to any of a bot's numbers, or naming its service, reaches that bot; checks as today."""

    def test_a_message_to_a_pool_number_reaches_the_bot_and_records_the_number_texted(
            self, client: FlaskClient, store: BotStore, redis: redis_lib.Redis) -> None:
        bot = make_bot(store, **{"main-phone-number": MAIN, "phone-numbers": [POOL_A]})
        assert 200 == text(client, POOL_A).status_code
        [queued] = [json.loads(raw) for raw in redis.lrange(keys.inbox(keys.conversation_id(bot.id, ALICE)), 0, -1)]
        assert (bot.id, POOL_A) == (queued["bot_id"], queued["to"])

    def test_a_message_naming_the_bots_service_reaches_it_from_an_unlisted_number(
            self, client: FlaskClient, store: BotStore, redis: redis_lib.Redis) -> None:
        """To is a pool number the registry does not list: MessagingServiceSid finds the bot; one conversation."""
        service = service_sid()
        bot = make_bot(store, **{"twilio-messaging-service-sid": service})
        assert 200 == text(client, UNLISTED, MessagingServiceSid=service).status_code
        assert 200 == text(client, POOL_B, MessagingServiceSid=service).status_code
        queued = [json.loads(raw) for raw in redis.lrange(keys.inbox(keys.conversation_id(bot.id, ALICE)), 0, -1)]
        assert [UNLISTED, POOL_B] == [message["to"] for message in queued]

    def test_an_unknown_number_with_an_unknown_service_is_404(self, client: FlaskClient, store: BotStore) -> None:
        make_bot(store, **{"twilio-messaging-service-sid": service_sid()})
        assert 404 == text(client, UNLISTED, MessagingServiceSid=service_sid()).status_code
        assert 404 == text(client, UNLISTED).status_code

    def test_signature_and_account_are_checked_for_a_bot_found_by_its_service(
            self, client: FlaskClient, store: BotStore) -> None:
        """The bot's token signs it or it is 403; another account's AccountSid is 403 too."""
        service = service_sid()
        make_bot(store, **{"twilio-messaging-service-sid": service})
        forged = post_signed(client, inbound_params(To=UNLISTED, MessagingServiceSid=service), token="x" * 32)
        other_account = text(client, UNLISTED, MessagingServiceSid=service, AccountSid="AC" + "f" * 32)
        assert (403, 403) == (forged.status_code, other_account.status_code)

    def test_an_account_sid_differing_only_in_case_is_the_bots(self, client: FlaskClient, store: BotStore) -> None:
        make_bot(store, **{"main-phone-number": MAIN})
        assert 200 == text(client, MAIN, AccountSid=BOT_ACCOUNT_SID.upper()).status_code

    def test_the_log_records_the_number_each_message_came_to(
            self, client: FlaskClient, store: BotStore, redis: redis_lib.Redis, twilio: TwilioStandin,
            worker: dramatiq.Worker) -> None:
        bot = make_bot(store, **{"main-phone-number": MAIN, "phone-numbers": [POOL_A]})
        text(client, POOL_A, Body="uno")
        twilio.wait_for(1)
        text(client, MAIN, Body="dos")
        twilio.wait_for(2)
        log_written(redis, sql())
        with sql().connect() as connection:
            rows = connection.execute(select(messages.c.text, messages.c.bot_number).where(
                messages.c.bot_id == bot.id, messages.c.direction == "in").order_by(messages.c.at)).all()
        assert [("uno", POOL_A), ("dos", MAIN)] == [tuple(row) for row in rows]


class TestOutbound:
    """Replies go from the number the person texted; through the service when the bot has one."""

    def test_a_bot_without_a_service_replies_from_the_number_texted(
            self, client: FlaskClient, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        make_bot(store, **{"main-phone-number": MAIN, "phone-numbers": [POOL_A, POOL_B]})
        text(client, POOL_B, sender=ALICE)
        text(client, MAIN, sender=BOB)
        twilio.wait_for(2)
        assert [(POOL_B, None)] == [(m.from_, m.messaging_service_sid) for m in sent_to(twilio, ALICE)]
        assert [(MAIN, None)] == [(m.from_, m.messaging_service_sid) for m in sent_to(twilio, BOB)]

    def test_a_bot_with_a_service_sends_through_it_from_the_number_texted(
            self, client: FlaskClient, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        """MessagingServiceSid on the wire, and From: the pool number the person wrote to (not the sticky pick)."""
        service = service_sid()
        twilio.set_service(service, [POOL_A, POOL_B, UNLISTED])
        make_bot(store, **{"twilio-messaging-service-sid": service})
        text(client, UNLISTED, MessagingServiceSid=service)
        [message] = twilio.wait_for(1)
        assert ([service], [UNLISTED], "accepted") == (
            message.form["MessagingServiceSid"], message.form["From"], _answered_status(message))

    def test_a_push_goes_from_the_number_last_texted_or_lets_the_service_pick(
            self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore, twilio: TwilioStandin,
            worker: dramatiq.Worker) -> None:
        """An operator's send to someone who texted POOL_B goes From it; to someone new, only the service."""
        service = service_sid()
        twilio.set_service(service, [POOL_A, POOL_B])
        bot = make_bot(store, **{"twilio-messaging-service-sid": service, "phone-numbers": [POOL_A, POOL_B]})
        text(client, POOL_B, sender=ALICE, MessagingServiceSid=service)
        twilio.wait_for(1)
        for person in (ALICE, BOB):
            response = client.post(f"{USERS}:{bot.id}/messages", headers=admin_headers,
                                   json={"to": person, "text": "aviso"})
            assert 202 == response.status_code, response.json
        twilio.wait_for(3)
        [pushed_to_alice] = [m for m in sent_to(twilio, ALICE) if m.body == "aviso"]
        [pushed_to_bob] = sent_to(twilio, BOB)
        assert ([POOL_B], [service]) == (pushed_to_alice.form["From"], pushed_to_alice.form["MessagingServiceSid"])
        assert "From" not in pushed_to_bob.form and [service] == pushed_to_bob.form["MessagingServiceSid"]

    @pytest.mark.parametrize("with_service", [False, True])
    def test_a_push_never_goes_from_a_number_the_bot_gave_away(
            self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore, twilio: TwilioStandin,
            worker: dramatiq.Worker, with_service: bool) -> None:
        """Alice last texted POOL_B, which then went to another bot: an operator's send to her goes from the
        main number (or, with a service, lets the service pick), never From POOL_B."""
        # Given Alice texted POOL_B and was answered from it
        service = service_sid()
        twilio.set_service(service, [MAIN, POOL_A, POOL_B])
        extra = {"twilio-messaging-service-sid": service} if with_service else {}
        bot = make_bot(store, **{"main-phone-number": MAIN, "phone-numbers": [POOL_A, POOL_B], **extra})
        text(client, POOL_B, sender=ALICE, **({"MessagingServiceSid": service} if with_service else {}))
        [answer] = twilio.wait_for(1)
        assert [POOL_B] == answer.form["From"]
        # When POOL_B is taken from the bot and given to another
        assert 200 == client.post(f"{USERS}:{bot.id}", headers=admin_headers,
                                  json={"phone-numbers": [POOL_A]}).status_code
        assert 200 == client.post(USERS, headers=admin_headers, json=bot_fields(
            **{"main-phone-number": POOL_B, "twilio-auth-token": "f" * 32})).status_code
        pushed = client.post(f"{USERS}:{bot.id}/messages", headers=admin_headers, json={"to": ALICE, "text": "aviso"})
        assert 202 == pushed.status_code, pushed.json
        # Then the push goes from the bot's main number, or through its service with no From
        [push] = [message for message in twilio.wait_for(2) if message.body == "aviso"]
        assert (None if with_service else [MAIN]) == push.form.get("From")

    def test_an_opt_out_answered_to_a_send_the_service_picks_for_is_kept_under_the_service(
            self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore, redis: redis_lib.Redis,
            twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        """A push to someone who never texted goes with no From; a 21610 answered to it opts them out of the
        service (its SID is the opt-out's sender), and the next push to them is suppressed, not sent."""
        service = service_sid()
        twilio.set_service(service, [POOL_A])
        twilio.fail_always(to=BOB, code=21610)
        bot = make_bot(store, **{"twilio-messaging-service-sid": service, "allow-cold-push": True})
        client.post(f"{USERS}:{bot.id}/messages", headers=admin_headers, json={"to": BOB, "text": "uno"})
        wait_until(lambda: optout.is_opted_out(redis, service, BOB), what="opted out of the service")
        with sql().connect() as connection:
            state = optout.read(connection, service, BOB)
        assert state is not None and state.opted_out
        client.post(f"{USERS}:{bot.id}/messages", headers=admin_headers, json={"to": BOB, "text": "dos"})
        time.sleep(1.0)
        assert ["uno"] == [attempt.body for attempt in twilio.attempts if attempt.to == BOB]

    def test_send_options_are_on_the_wire_when_set_and_absent_when_not(
            self, client: FlaskClient, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        service = service_sid()
        twilio.set_service(service, [POOL_A])
        make_bot(store, **{"main-phone-number": MAIN})
        make_bot(store, **{"twilio-messaging-service-sid": service, "validity-period": 300, "smart-encoded": True,
                           "shorten-urls": True})
        text(client, MAIN, sender=ALICE)
        text(client, POOL_A, sender=BOB, MessagingServiceSid=service)
        twilio.wait_for(2)
        [plain] = sent_to(twilio, ALICE)
        [pooled] = sent_to(twilio, BOB)
        options = ("ValidityPeriod", "SmartEncoded", "ShortenUrls", "MessagingServiceSid")
        assert set() == set(options) & set(plain.form)
        assert [["300"], ["true"], ["true"], [service]] == [pooled.form[name] for name in options]

    def test_a_service_is_paced_as_one_sender_whatever_numbers_the_replies_go_from(
            self, client: FlaskClient, store: BotStore, twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        """At 4 messages/s, eight people texting two pool numbers get replies >= 0.25 s apart at the
        stand-in: the service's throughput is the campaign's, not each number's."""
        service = service_sid()
        twilio.set_service(service, [POOL_A, POOL_B])
        bot = make_bot(store, **{"twilio-messaging-service-sid": service, "messages-per-second": 4.0})
        people = [f"+1555222{n:04d}" for n in range(8)]
        for n, person in enumerate(people):
            text(client, (POOL_A, POOL_B)[n % 2], sender=person, MessagingServiceSid=service)
        arrived = twilio.wait_for(8, timeout=20)
        times = sorted(message.received_at for message in arrived)
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        assert min(gaps) >= 0.25 - 0.02, gaps
        assert {POOL_A, POOL_B} == {message.from_ for message in arrived}
        assert bot.messages_per_second == 4.0


def _answered_status(message: SentMessage) -> str:
    """What Twilio's answer to the create said (a service's message starts accepted)."""
    return "accepted" if message.messaging_service_sid else "queued"


# --- Status callbacks: through the real web app over HTTP, from a stand-in that calls back. ---


@pytest.fixture
def calling_back(live_server: str, worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch) -> Iterator[TwilioStandin]:
    """A Twilio stand-in that calls back status like Twilio, at the web app served on a real port; the
    in-process worker sends to it and names PUBLIC_URL's status callback."""
    with TwilioStandin(status_callbacks=True) as standin:
        monkeypatch.setenv("PUBLIC_URL", live_server)
        monkeypatch.setenv("TWILIO_API_BASE_URL", standin.url)
        get_settings.cache_clear()
        try:
            yield standin
        finally:
            monkeypatch.undo()  # before the settings are read again
            get_settings.cache_clear()


def delivery(sid: str) -> dict[str, Any]:
    with sql().connect() as connection:
        row = connection.execute(select(deliveries).where(deliveries.c.sid == sid)).first()
    return dict(row._mapping) if row is not None else {}


class TestStatusCallbacks:
    """What a service reports by callback: its statuses in order, late opt-outs and full queues."""

    def test_a_service_send_goes_from_accepted_to_delivered_in_order(
            self, client: FlaskClient, store: BotStore, calling_back: TwilioStandin) -> None:
        """The create answers accepted; callbacks say queued, sent, delivered; each is kept with its time."""
        service = service_sid()
        calling_back.set_service(service, [POOL_A])
        bot = make_bot(store, **{"twilio-messaging-service-sid": service})
        text(client, POOL_A, MessagingServiceSid=service)
        [message] = calling_back.wait_for(1)
        wait_until(lambda: delivery(message.sid).get("status") == "delivered", what="delivered")
        stored = delivery(message.sid)
        assert bot.id == stored["bot_id"]
        assert stored["queued_at"] <= stored["sent_at"] <= stored["delivered_at"]

    def test_callbacks_for_finished_replies_leave_nothing_in_redis(
            self, client: FlaskClient, store: BotStore, redis: redis_lib.Redis, calling_back: TwilioStandin) -> None:
        """Every send's queued, sent and delivered callbacks come after its reply is finished: once all are
        delivered and the outbox is empty, no replies hash is left (Redis is never bounded by history)."""
        bot = make_bot(store, **{"main-phone-number": MAIN})
        for person in (ALICE, BOB):
            text(client, MAIN, sender=person)
        for message in calling_back.wait_for(2):
            wait_until(lambda: delivery(message.sid).get("status") == "delivered", what="delivered")
        for person in (ALICE, BOB):
            wait_until(lambda: 0 == redis.llen(keys.outbox(keys.conversation_id(bot.id, person))), what="empty outbox")
        assert [] == redis.keys(keys.replies(keys.conversation_id(bot.id, "*")))

    def test_a_late_opt_out_opts_the_person_out_of_the_whole_service(
            self, client: FlaskClient, store: BotStore, redis: redis_lib.Redis, calling_back: TwilioStandin) -> None:
        """21610 in a callback: the person is opted out of the bot's service (Twilio's opt-out covers every
        sender of a service), so the next reply to them is suppressed whichever pool number they text."""
        service = service_sid()
        calling_back.set_service(service, [POOL_A, POOL_B])
        calling_back.fail_after_accept(to=ALICE, code=21610)
        make_bot(store, **{"twilio-messaging-service-sid": service})
        text(client, POOL_A, MessagingServiceSid=service, Body="uno")
        calling_back.wait_for(1)
        wait_until(lambda: optout.is_opted_out(redis, service, ALICE), what="opted out")
        with sql().connect() as connection:
            state = optout.read(connection, service, ALICE)
        assert state is not None and (True, optout.HOW_21610) == (state.opted_out, state.how)
        text(client, POOL_B, MessagingServiceSid=service, Body="dos")
        time.sleep(1.5)
        assert ["echo: uno"] == [message.body for message in calling_back.messages]

    def test_a_stop_to_one_pool_number_stops_the_operators_sends_too(
            self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore, redis: redis_lib.Redis,
            calling_back: TwilioStandin) -> None:
        service = service_sid()
        calling_back.set_service(service, [POOL_A, POOL_B])
        bot = make_bot(store, **{"twilio-messaging-service-sid": service})
        text(client, POOL_A, MessagingServiceSid=service, Body="STOP")
        wait_until(lambda: optout.is_opted_out(redis, service, ALICE), what="opted out")
        sent = client.post(f"/app:mammut-1/graph/user:{bot.id}/messages", headers=admin_headers,
                           json={"to": ALICE, "text": "¿seguro?"})
        assert (409, ["opted out"]) == (sent.status_code, sent.json["errors"]["to"])

    def test_a_queue_overflow_by_callback_sends_the_reply_again_later(
            self, client: FlaskClient, store: BotStore, redis: redis_lib.Redis, calling_back: TwilioStandin,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """30001 in a callback (Twilio's queue for the service was full): the reply goes again, after a
        slow backoff, as a new reply the log links to the same inbound; once the queue drains, it arrives."""
        monkeypatch.setitem(BACKOFF, Action.RETRY_SLOWLY, (0.5, 1.0))
        service = service_sid()
        calling_back.set_service(service, [POOL_A])
        calling_back.queue_overflow(service)
        bot = make_bot(store, **{"twilio-messaging-service-sid": service})
        text(client, POOL_A, MessagingServiceSid=service, Body="hola")
        calling_back.wait_for(1)
        calling_back.queue_overflow(service, on=False)
        messages_sent = calling_back.wait_for(2, timeout=15)
        first, again = messages_sent[:2]
        assert ("echo: hola", "echo: hola") == (first.body, again.body)
        assert again.received_at - first.received_at >= 0.5
        log_written(redis, sql())
        with sql().connect() as connection:
            page = messagelog.read(connection, bot.id, ALICE).items
        replies = [entry for entry in page if entry["direction"] == "out"]
        assert 2 == len(replies)
        assert (30001, "failed") == (replies[0]["error-code"], replies[0]["status"])
        assert replies[1]["id"] == replies[0]["id"] + "~1"

    def test_a_send_settled_by_its_status_callback_counts_toward_the_daily_budget(
            self, client: FlaskClient, store: BotStore, redis: redis_lib.Redis, calling_back: TwilioStandin,
            monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]) -> None:
        """max-messages-per-day 1: a first reply whose answer was lost, settled by the callback that named
        it, is the day's send, so the next reply is held back."""
        from worker import outbound

        monkeypatch.setattr(outbound, "RECONCILE_RECHECK_SECONDS", 0.5)
        calling_back.accept_then_drop(1)
        bot = make_bot(store, **{"main-phone-number": MAIN, "max-messages-per-day": 1})
        send_as_engine(redis, bot, ALICE, "first")
        calling_back.wait_for(1)
        wait_until(lambda: any(event["event"] == "outbound.reconciled" for event in logs), what="settled")
        send_as_engine(redis, bot, BOB, "over the budget")
        wait_until(lambda: any(event["event"] == "outbound.held_back" for event in logs), what="held back")
        assert (["callback"], ["first"]) == (
            [event["how"] for event in logs if event["event"] == "outbound.reconciled"],
            [message.body for message in calling_back.messages])

    def test_a_queue_overflow_called_back_several_times_sends_the_reply_again_once(
            self, client: FlaskClient, store: BotStore, redis: redis_lib.Redis, twilio: TwilioStandin,
            worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch) -> None:
        """Twilio may call back 30001 for one message more than once (the same callback retried, or
        `undelivered` then `failed`): the reply goes again once, not once per callback."""
        monkeypatch.setitem(BACKOFF, Action.RETRY_SLOWLY, (0.2, 0.4))
        bot = make_bot(store, **{"main-phone-number": MAIN})
        [reply_id] = send_as_engine(redis, bot, ALICE, "¿sigues ahí?")
        [sent] = twilio.wait_for(1)
        log_written(redis, sql())
        for status in ("undelivered", "undelivered", "failed"):
            form = {"MessageSid": sent.sid, "MessageStatus": status, "ErrorCode": "30001",
                    "AccountSid": BOT_ACCOUNT_SID, "From": MAIN, "To": ALICE}
            assert 200 == post_signed(client, form, path=f"{STATUS_PATH}?reply={reply_id}").status_code
        twilio.wait_for(2, timeout=15)
        time.sleep(1.5)  # room for a third, were one coming
        assert ["¿sigues ahí?", "¿sigues ahí?"] == [message.body for message in sent_to(twilio, ALICE)]

    def test_a_queue_overflow_past_the_resends_is_a_dead_letter(
            self, client: FlaskClient, store: BotStore, calling_back: TwilioStandin,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """A queue that stays full: the reply is sent MAX_RESENDS more times, then kept for `mammut-sms dlq`."""
        from shared import conversations, deadletters

        monkeypatch.setitem(BACKOFF, Action.RETRY_SLOWLY, (0.1, 0.2))
        monkeypatch.setattr(conversations, "MAX_RESENDS", 2)
        service = service_sid()
        calling_back.set_service(service, [POOL_A])
        calling_back.queue_overflow(service)
        make_bot(store, **{"twilio-messaging-service-sid": service})
        text(client, POOL_A, MessagingServiceSid=service)
        calling_back.wait_for(3, timeout=15)

        def dead() -> list[dict[str, Any]]:
            with sql().connect() as connection:
                return deadletters.list_all(connection)

        wait_until(lambda: dead(), what="a dead letter")
        [letter] = dead()
        assert (30001, "exhausted") == (letter["error_code"], letter["reason"])
        time.sleep(0.5)
        assert 3 == len(calling_back.messages)


class TestStatusCallbackRouting:
    """Callbacks that name a service find the bot through it; canceled and 30036 are final, with a hint."""

    def callback(self, sid: str, status: str, **extra: str) -> dict[str, str]:
        return {"MessageSid": sid, "MessageStatus": status, "AccountSid": BOT_ACCOUNT_SID, "To": ALICE, **extra}

    def test_a_callback_naming_the_service_without_a_from_finds_the_bot(
            self, client: FlaskClient, store: BotStore) -> None:
        service = service_sid()
        bot = make_bot(store, **{"twilio-messaging-service-sid": service})
        sid = "SM" + uuid.uuid4().hex
        response = post_signed(client, self.callback(sid, "accepted", MessagingServiceSid=service), path=STATUS_PATH)
        assert (200, bot.id, "accepted") == (response.status_code, delivery(sid)["bot_id"], delivery(sid)["status"])

    def test_accepted_and_scheduled_never_move_a_status_back(self, client: FlaskClient, store: BotStore) -> None:
        service = service_sid()
        make_bot(store, **{"twilio-messaging-service-sid": service})
        sid = "SM" + uuid.uuid4().hex
        for status in ("sent", "accepted", "scheduled", "queued"):
            post_signed(client, self.callback(sid, status, MessagingServiceSid=service, From=POOL_A), path=STATUS_PATH)
        stored = delivery(sid)
        assert "sent" == stored["status"] and stored["accepted_at"] and stored["scheduled_at"]

    @pytest.mark.parametrize(("status", "code", "hint"), [
        ("canceled", None, "canceled before Twilio sent it"),
        ("failed", "30036", "validity-period"),
    ])
    def test_canceled_and_expired_are_final_failures_with_a_hint(
            self, client: FlaskClient, store: BotStore, logs: list[dict[str, Any]], status: str, code: str | None,
            hint: str) -> None:
        service = service_sid()
        make_bot(store, **{"twilio-messaging-service-sid": service})
        sid = "SM" + uuid.uuid4().hex
        extra = {"ErrorCode": code} if code else {}
        post_signed(client, self.callback(sid, status, MessagingServiceSid=service, **extra), path=STATUS_PATH)
        post_signed(client, self.callback(sid, "sent", MessagingServiceSid=service), path=STATUS_PATH)
        [failed] = [event for event in logs if event["event"] == "status.failed"]
        assert status == delivery(sid)["status"]
        assert hint in str(failed["hint"])

    def test_the_number_a_service_sent_from_is_a_bot_number_and_cannot_be_claimed(
            self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore, redis: redis_lib.Redis) -> None:
        """A callback names the unlisted pool number the service picked: the loop guard knows it as the
        bot's, and another bot asking for it is refused with 409 naming the bot."""
        from shared.poolnumbers import POOL_NUMBERS

        service = service_sid()
        bot = make_bot(store, **{"twilio-messaging-service-sid": service})
        sid = "SM" + uuid.uuid4().hex
        post_signed(client, self.callback(sid, "sent", MessagingServiceSid=service, From=UNLISTED), path=STATUS_PATH)
        claimed = client.post(USERS, headers=admin_headers, json=bot_fields(**{"main-phone-number": UNLISTED}))
        assert (bot.id, 409) == (POOL_NUMBERS.owner(redis, UNLISTED), claimed.status_code)
        assert f"{UNLISTED} already belongs to bot {bot.id}" == claimed.json["message"]

    def test_a_callback_with_neither_from_nor_service_is_400(self, client: FlaskClient, store: BotStore) -> None:
        make_bot(store, **{"main-phone-number": MAIN})
        response = post_signed(client, self.callback("SM" + uuid.uuid4().hex, "sent"), path=STATUS_PATH)
        assert 400 == response.status_code


class TestOptOutsFollowTheBot:
    """A STOP holds across every change of a bot's numbers or service, in both directions."""

    def test_a_stop_holds_when_the_bot_moves_onto_a_service_and_off_it_again(
            self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore, redis: redis_lib.Redis,
            twilio: TwilioStandin, worker: dramatiq.Worker) -> None:
        """STOP to the bot's number; then give it a service (the 10DLC step), then take it away: after
        each change an operator's send is refused with 409, an engine's push is suppressed, not sent,
        and /conversations says opted-out."""
        service = service_sid()
        twilio.set_service(service, [MAIN, POOL_A])
        bot = make_bot(store, **{"main-phone-number": MAIN, "allow-cold-push": True})
        text(client, MAIN, Body="STOP")
        wait_until(lambda: _opted_out_in_db(MAIN, ALICE), what="the STOP recorded")
        for change in ({"twilio-messaging-service-sid": service}, {"twilio-messaging-service-sid": None}):
            changed = client.post(f"{USERS}:{bot.id}", headers=admin_headers, json=change)
            assert 200 == changed.status_code, changed.json
            sent = client.post(f"{USERS}:{bot.id}/messages", headers=admin_headers, json={"to": ALICE, "text": "oferta"})
            assert (409, change) == (sent.status_code, change)
            pushed = client.post(f"/channels/sms/callback/{bot.id}", headers=admin_headers,
                                 json={"recipient_id": ALICE, "text": f"push {change}"})
            assert 202 == pushed.status_code, pushed.json
            wait_until(lambda: _status_of(redis, bot.id, f"push {change}") == "suppressed", what="the push suppressed")
            listed = client.get(f"{USERS}:{bot.id}/conversations", headers=admin_headers).json["data"]["conversations"]
            assert [(ALICE, True)] == [(entry["person"], entry["opted-out"]) for entry in listed]
        assert [] == sent_to(twilio, ALICE)


    def test_a_stop_not_yet_in_the_database_follows_the_bot_too(
            self, store: BotStore, redis: redis_lib.Redis) -> None:
        """A STOP the webhook wrote into the number's Redis copy, which the worker has yet to record: once
        the bot moves onto a service, the service's copy has it (the database alone would not)."""
        bot = make_bot(store, **{"main-phone-number": MAIN})
        redis.hset(keys.opted_out(MAIN), ALICE, optout.LIVE)
        service = service_sid()
        store.update(bot.id, {"twilio-messaging-service-sid": service})
        assert optout.is_opted_out(redis, service, ALICE)


def _opted_out_in_db(key: str, person: str) -> bool:
    with sql().connect() as connection:
        state = optout.read(connection, key, person)
    return bool(state and state.opted_out)


def _status_of(redis: redis_lib.Redis, bot_id: int, text_sent: str) -> str | None:
    """The logged status of the bot's reply to ALICE with this text (None before it is logged)."""
    log_written(redis, sql())
    with sql().connect() as connection:
        entries = messagelog.read(connection, bot_id, ALICE, limit=messagelog.MAX_LIMIT).items
    return next((entry["status"] for entry in entries if entry["text"] == text_sent), None)


class TestLoopsThroughPoolNumbers:
    """A number a bot's service has sent from is a bot number, listed or not: no bot answers it."""

    @pytest.mark.parametrize("standin", ["calling_back", "twilio"], ids=["with-callbacks", "answers-only"])
    def test_two_service_bots_texting_each_other_through_unlisted_pool_numbers_stop_at_once(
            self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore, request: pytest.FixtureRequest,
            standin: str) -> None:
        """Bot A's operator texts bot B's unlisted pool number; Twilio carries each SMS between the two
        services (relayed here as signed inbounds): the echo bots stop after a reply or two, long
        before the 20 replies a minute that would stop them otherwise, with status callbacks or
        only Twilio's answers to tell which numbers the services sent from."""
        if standin == "twilio":
            request.getfixturevalue("worker")
        calling_back: TwilioStandin = request.getfixturevalue(standin)
        services = {POOL_A: service_sid(), POOL_B: service_sid()}
        for number, service in services.items():
            calling_back.set_service(service, [number])
            make_bot(store, **{"twilio-messaging-service-sid": service})

        def deliver(message: SentMessage, service: str) -> None:
            text(client, message.to, sender=message.from_ or "", MessagingServiceSid=service, Body=message.body)

        with carrying(calling_back, services, deliver):
            sent = client.post(f"{USERS}:1/messages", headers=admin_headers, json={"to": POOL_B, "text": "hola"})
            assert 202 == sent.status_code, sent.json
            time.sleep(6.0)
        between_bots = [message.body for message in calling_back.messages if message.to in services]
        assert 1 <= len(between_bots) <= 3, between_bots


class TestHotPath:
    """Finding a bot by a pool number or by its service costs the webhook no query per message."""

    def test_webhooks_to_an_unlisted_pool_number_cost_no_query_once_cached(
            self, app: Any, client: FlaskClient, store: BotStore) -> None:
        from tests.test_bot_store import counted_queries
        from tests.test_inbound import wait_for_cache_listener
        from webhook import deps

        service = service_sid()
        make_bot(store, **{"twilio-messaging-service-sid": service, "main-phone-number": MAIN,
                           "phone-numbers": [POOL_A]})
        wait_for_cache_listener(app)
        for to in (UNLISTED, POOL_A):
            assert 200 == text(client, to, MessagingServiceSid=service).status_code  # cached from here on
        with app.app_context():
            engine = deps.get_engine()
        with counted_queries(engine) as statements:
            for n in range(5):
                assert 200 == text(client, (UNLISTED, POOL_A)[n % 2], MessagingServiceSid=service).status_code
        assert [] == statements


def test_the_migration_keeps_bots_numbers_and_never_reuses_a_deleted_bots_id(tmp_path: Any) -> None:
    """0004 on SQLite copies the bots table (main-phone-number becomes optional): its numbers land in
    bot_numbers, and AUTOINCREMENT's counter survives, so a deleted bot's id (its log keeps it) is not
    given to the next bot."""
    from alembic import command
    from sqlalchemy import text as sql_text

    from shared import db

    url = f"sqlite:///{tmp_path}/upgrade.sqlite3"
    config = db._alembic_config(url)
    command.upgrade(config, "0003")
    engine = db.make_engine(url)
    insert = sql_text("INSERT INTO bots (name, account_sid, auth_token_encrypted, main_phone_number, "
                      "messages_per_second, extra, created_at, updated_at) VALUES ('b', 'AC', 'x', :n, 1, '{}', 0, 0)")
    with engine.begin() as connection:
        for number in (MAIN, POOL_A, POOL_B):
            connection.execute(insert, {"n": number})
        connection.execute(sql_text("DELETE FROM bots WHERE id = 3"))
    engine.dispose()

    command.upgrade(config, "head")

    engine = db.make_engine(url)
    with engine.begin() as connection:
        connection.execute(insert, {"n": None})
        ids = connection.execute(sql_text("SELECT id, main_phone_number FROM bots ORDER BY id")).all()
        numbers = connection.execute(sql_text("SELECT number, bot_id FROM bot_numbers ORDER BY bot_id")).all()
    engine.dispose()
    assert [(1, MAIN), (2, POOL_A), (4, None)] == [tuple(row) for row in ids]
    assert [(MAIN, 1), (POOL_A, 2)] == [tuple(row) for row in numbers]
