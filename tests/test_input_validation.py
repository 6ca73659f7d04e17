"""Input that is never accepted, through HTTP: non-ASCII digits, senders Twilio cannot have sent,
container or secret-looking user fields, oversized log fields, and one tenant's SIDs in another's requests."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select

from shared import db, keys
from shared.bots import Bot, BotStore
from shared.logging import MAX_FIELD_CHARS, configure_logging
from shared.schema import bots, deliveries, messages
from shared.schemas import MAX_EXTRA_FIELDS
from shared.settings import DEVELOPMENT, Settings
from tests.conftest import ADMIN_TOKEN, BOT_ACCOUNT_SID, BOT_NUMBER, CREDENTIALS_KEY
from tests.test_registry import USERS, seed_body
from tests.test_signature import INBOUND_PATH, inbound_params, post_signed

FULLWIDTH = "+1５５５０００１１１１"
ARABIC_INDIC = "+1٥٥٥٠٠٠١١١١"
OTHER_ACCOUNT_SID = "AC" + "fedcba9876543210" * 2
OTHER_AUTH_TOKEN = "fedcba9876543210fedcba9876543210"
OTHER_NUMBER = "+15005550009"
STATUS_PATH = "/channels/sms/status"


@pytest.fixture
def other_bot(store: BotStore) -> Bot:
    """A second tenant: its own Twilio account, token and number."""
    return store.create({
        "name": "other-bot", "twilio-account-sid": OTHER_ACCOUNT_SID,
        "twilio-auth-token": OTHER_AUTH_TOKEN, "main-phone-number": OTHER_NUMBER,
    })


@pytest.fixture
def sql(database: str) -> Iterator[Engine]:
    engine = db.make_engine(database, size=2)
    yield engine
    engine.dispose()


def rejections(logs: list[dict[str, Any]], event: str) -> list[str]:
    return [entry["reason"] for entry in logs if entry["event"] == event]


class TestAsciiDigits:
    """A number is read only in ASCII digits."""

    @pytest.mark.parametrize("number", [FULLWIDTH, ARABIC_INDIC], ids=["fullwidth", "arabic-indic"])
    def test_registry_refuses_a_main_number_in_other_digits(self, client: FlaskClient, admin_headers: dict[str, str],
                                                            number: str) -> None:
        """A main-phone-number in fullwidth or Arabic-Indic digits is a 400 naming the field."""
        response = client.post(USERS, json=seed_body(**{"main-phone-number": number}), headers=admin_headers)

        assert 400 == response.status_code
        assert ["main-phone-number"] == list(response.json["errors"])

    def test_registry_accepts_a_seven_digit_e164_number(self, client: FlaskClient,
                                                        admin_headers: dict[str, str]) -> None:
        """The shape is '+' and 7 to 15 ASCII digits: the shortest is registered."""
        response = client.post(USERS, json=seed_body(**{"main-phone-number": "+2901234"}), headers=admin_headers)

        assert 200 == response.status_code

    @pytest.mark.parametrize("number", [FULLWIDTH, ARABIC_INDIC], ids=["fullwidth", "arabic-indic"])
    def test_engine_callback_refuses_a_recipient_in_other_digits(self, client: FlaskClient,
                                                                 admin_headers: dict[str, str], bot: Bot,
                                                                 number: str) -> None:
        """An engine's recipient_id in fullwidth or Arabic-Indic digits is a 400 naming the field."""
        response = client.post(f"/channels/sms/callback/{bot.id}", headers=admin_headers,
                               json={"recipient_id": number, "text": "hola"})

        assert 400 == response.status_code
        assert "recipient_id" in response.json["message"]

    def test_a_bot_id_in_superscript_digits_is_not_found_not_500(self, client: FlaskClient,
                                                                  admin_headers: dict[str, str]) -> None:
        """'²' passes str.isdigit() but is no bot id: 404, not a ValueError."""
        assert 404 == client.get(USERS + ":²", headers=admin_headers).status_code


class TestInboundSender:
    """Only senders Twilio can deliver are answered; bodies lose their control characters."""

    @pytest.mark.parametrize("sender", ["+15551230001", "+15005550006", "+2901234", "12345", "MyBank", "Acme 24"],
                             ids=["e164", "twilio-test-number", "seven-digits", "short-code", "alphanumeric",
                                  "alphanumeric-space"])
    def test_senders_twilio_delivers_are_accepted(self, client: FlaskClient, bot: Bot, sender: str,
                                                  logs: list[dict[str, Any]]) -> None:
        """E.164 shapes, short codes and alphanumeric sender ids are received."""
        response = post_signed(client, inbound_params(From=sender))

        assert (200, ["inbound.received"]) == (response.status_code,
                                               [e["event"] for e in logs if e["event"].startswith("inbound.")])

    @pytest.mark.parametrize("sender", [
        "client:alice", "alice@example.com", "A" * 5000, "+1555\n1230001", "+15551230001\x00", "whatsapp:+15551230001",
        "+05551230001", "+155512", "123456789", "123456789012", FULLWIDTH,
    ], ids=["client", "email", "5000-As", "newline", "nul", "whatsapp", "leading-zero", "too-short-e164",
            "nine-digits-no-plus", "twelve-chars", "fullwidth"])
    def test_other_senders_are_refused_with_a_reason(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                     sender: str, logs: list[dict[str, Any]]) -> None:
        """Anything else is a 400 logged as bad_sender, and nothing is queued for the engine."""
        response = post_signed(client, inbound_params(From=sender))

        assert (400, ["bad_sender"]) == (response.status_code, rejections(logs, "inbound.rejected"))
        assert [] == redis.keys(keys.inbox("*"))

    def test_control_characters_are_stripped_from_the_body(self, client: FlaskClient, bot: Bot,
                                                           redis: redis_lib.Redis) -> None:
        """NUL, escape and other controls are removed before the engine sees the body; tab and newline stay."""
        post_signed(client, inbound_params(Body="ho\x00la\x1b[2J\r\n\tadiós\x7f\x85"))

        [inbox] = redis.keys(keys.inbox("*"))
        [stored] = [json.loads(item) for item in redis.lrange(inbox, 0, -1)]
        assert "hola[2J\n\tadiós" == stored["body"]


class TestLogFields:
    """No request field reaches a log line at its full length."""

    def test_a_huge_message_sid_is_truncated_in_the_log_line(self, client: FlaskClient, bot: Bot,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
        """An unsigned request with a 60 KB MessageSid logs its rejection in well under 60 KB."""
        # Given logging rendered to stderr as the processes do (development: uncached loggers)
        configure_logging(Settings(admin_api_token=ADMIN_TOKEN, credentials_keys=(CREDENTIALS_KEY,),
                                   environment=DEVELOPMENT))
        capsys.readouterr()
        # When an unsigned request carries a 60 KB MessageSid
        response = client.post(INBOUND_PATH, data=inbound_params(MessageSid="S" * 60_000))
        # Then it is refused, and its log line holds a capped, marked prefix of the SID
        [line] = [line for line in capsys.readouterr().err.splitlines() if "inbound.rejected" in line]
        assert 403 == response.status_code
        assert "S" * MAX_FIELD_CHARS + "…[+59800 chars]" in line
        assert len(line) < 2 * MAX_FIELD_CHARS + 500


class TestExtraFields:
    """Additional user fields are short scalars under names that do not hold secrets."""

    @pytest.mark.parametrize("value", ["es", 3, 2.5, True, None, "x" * 1000],
                             ids=["string", "int", "float", "bool", "null", "1000-chars"])
    def test_scalar_extra_fields_are_stored(self, client: FlaskClient, admin_headers: dict[str, str],
                                            value: Any) -> None:
        """Strings up to 1,000 characters, numbers, booleans and null are accepted."""
        response = client.post(USERS, json=seed_body(language=value), headers=admin_headers)

        assert 200 == response.status_code

    @pytest.mark.parametrize("value", [["a"], {"a": 1}, "x" * 1001, 10**30],
                             ids=["list", "object", "1001-chars", "huge-int"])
    def test_other_extra_fields_are_refused_naming_the_field(self, client: FlaskClient,
                                                             admin_headers: dict[str, str], value: Any) -> None:
        """Lists, objects, over-long strings and unbounded numbers are a 400 naming the field."""
        response = client.post(USERS, json=seed_body(language=value), headers=admin_headers)

        assert (400, ["language"]) == (response.status_code, list(response.json["errors"]))

    @pytest.mark.parametrize("depth", [1000, 20_000])
    def test_deeply_nested_json_is_a_bad_request_not_500(self, client: FlaskClient, admin_headers: dict[str, str],
                                                         store: BotStore, depth: int) -> None:
        """JSON nested 1,000 or 20,000 deep is a 400, and the registry keeps working afterwards."""
        body = json.dumps(seed_body())[:-1] + ', "profile": ' + "[" * depth + "]" * depth + "}"

        response = client.post(USERS, data=body, content_type="application/json", headers=admin_headers)

        assert 400 == response.status_code
        assert ([], 200) == (store.all(), client.get(USERS, headers=admin_headers).status_code)

    def test_an_integer_past_pythons_digit_limit_is_a_bad_request(self, client: FlaskClient,
                                                                   admin_headers: dict[str, str]) -> None:
        """A 5,000-digit number makes json.loads raise ValueError: a 400, not a 500."""
        body = json.dumps(seed_body())[:-1] + ', "age": ' + "1" * 5000 + "}"

        response = client.post(USERS, data=body, content_type="application/json", headers=admin_headers)

        assert 400 == response.status_code

    def test_more_than_the_maximum_number_of_extra_fields_is_refused(self, client: FlaskClient,
                                                                     admin_headers: dict[str, str]) -> None:
        """At most MAX_EXTRA_FIELDS additional fields."""
        extras = {f"field{n}": n for n in range(MAX_EXTRA_FIELDS + 1)}

        assert 400 == client.post(USERS, json=seed_body(**extras), headers=admin_headers).status_code

    @pytest.mark.parametrize("name", ["password", "engine_token", "client_secret", "api_key", "token", "accessToken",
                                      "apiToken", "authToken", "private_key", "privateKey", "passwd", "pwd",
                                      "credentials", "bearer", "auth", "TOKEN1"])
    def test_secret_looking_extra_fields_are_stored_encrypted_and_shown_redacted(
            self, client: FlaskClient, admin_headers: dict[str, str], app: Flask, name: str) -> None:
        """A field named like a secret is kept, but neither the database row nor any answer holds its value."""
        created = client.post(USERS, json=seed_body(**{name: "s3cr3t-value", "team": "sales"}), headers=admin_headers)
        bot_id = created.json["taskResult"][0]["affectedElementId"]
        shown = client.get(f"{USERS}:{bot_id}", headers=admin_headers)
        listed = client.get(USERS, headers=admin_headers)

        assert 200 == created.status_code
        [user] = shown.json["data"]["user"]
        assert ("[redacted]", "sales") == (user[name], user["team"])
        for answer in (created, shown, listed):
            assert "s3cr3t-value" not in answer.get_data(as_text=True)
        assert "s3cr3t-value" not in json.dumps(_stored_extra(app.extensions["mammut"].engine, bot_id))

    def test_a_secret_field_set_to_null_is_removed(self, client: FlaskClient, admin_headers: dict[str, str],
                                                   app: Flask) -> None:
        """`{"token": null}` removes the field and its encrypted value; other fields stay."""
        created = client.post(USERS, json=seed_body(token="s3cr3t-value", team="sales"), headers=admin_headers)
        bot_id = created.json["taskResult"][0]["affectedElementId"]

        assert 200 == client.post(f"{USERS}:{bot_id}", json={"token": None}, headers=admin_headers).status_code
        [user] = client.get(f"{USERS}:{bot_id}", headers=admin_headers).json["data"]["user"]
        assert ("token" not in user, "sales") == (True, user["team"])
        assert ["team"] == list(_stored_extra(app.extensions["mammut"].engine, bot_id))

    def test_a_key_in_a_handoff_or_engine_urls_path_is_not_shown(self, client: FlaskClient,
                                                                  admin_headers: dict[str, str]) -> None:
        """A Slack-style URL keeps its ids in GET's answer, never its key."""
        url = "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/Zx9SecretAbcdefGhijklMnop"
        created = client.post(USERS, json=seed_body(**{"handoff-url": url, "engine-url": url}), headers=admin_headers)
        bot_id = created.json["taskResult"][0]["affectedElementId"]
        [user] = client.get(f"{USERS}:{bot_id}", headers=admin_headers).json["data"]["user"]

        shown = "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/[redacted]"
        assert (shown, shown) == (user["handoff-url"], user["engine-url"])


def _stored_extra(engine: Engine, bot_id: int) -> dict[str, Any]:
    """The bot's extra user fields as the database row holds them."""
    with engine.connect() as connection:
        return dict(connection.execute(select(bots.c.extra).where(bots.c.id == bot_id)).scalar_one())


def status_callback(sid: str, status: str, account_sid: str, number: str) -> dict[str, str]:
    """The form Twilio posts to StatusCallback for a message sent from `number`."""
    return {"MessageSid": sid, "MessageStatus": status, "AccountSid": account_sid, "From": number,
            "To": "+15551230001", "ApiVersion": "2010-04-01"}


def delivery(sql: Engine, sid: str) -> tuple[int, str] | None:
    """(bot id, status) of a MessageSid's `deliveries` row, None when there is none."""
    with sql.connect() as connection:
        query = select(deliveries.c.bot_id, deliveries.c.status).where(deliveries.c.sid == sid)
        row = connection.execute(query).first()
    return (row.bot_id, row.status) if row is not None else None


class TestStatusCallbackOwnership:
    """A status callback changes only the calling bot's own messages."""

    def test_a_callback_for_another_bots_sid_is_ignored(self, client: FlaskClient, bot: Bot, other_bot: Bot,
                                                        sql: Engine, logs: list[dict[str, Any]]) -> None:
        """Bot A's signed callback naming bot B's MessageSid is acknowledged, logged and not recorded."""
        # Given bot B's message delivered
        sid = "SM" + uuid.uuid4().hex
        post_signed(client, status_callback(sid, "delivered", OTHER_ACCOUNT_SID, OTHER_NUMBER), path=STATUS_PATH,
                    token=OTHER_AUTH_TOKEN)
        # When bot A, signing with its own token, reports it read with an error
        response = post_signed(client, {**status_callback(sid, "read", BOT_ACCOUNT_SID, BOT_NUMBER),
                                        "ErrorCode": "30007"}, path=STATUS_PATH)
        # Then B's record is untouched, and the refusal is logged
        assert (200, (other_bot.id, "delivered")) == (response.status_code, delivery(sql, sid))
        assert ["not_this_bots_message"] == rejections(logs, "status.rejected")

    def test_a_callback_for_a_sid_another_bot_sent_is_ignored(self, client: FlaskClient, bot: Bot, other_bot: Bot,
                                                              sql: Engine) -> None:
        """The worker's own record of who sent a SID decides, before any callback for it arrived."""
        sid = "SM" + uuid.uuid4().hex
        with sql.begin() as connection:
            connection.execute(messages.insert().values(
                id=uuid.uuid4().hex, bot_id=other_bot.id, person="+15551230001", bot_number=OTHER_NUMBER,
                direction="out", origin="engine", text="hola", media=[], sid=sid, status="queued",
                at=time.time(), updated_at=time.time()))

        response = post_signed(client, status_callback(sid, "failed", BOT_ACCOUNT_SID, BOT_NUMBER), path=STATUS_PATH)

        assert (200, None) == (response.status_code, delivery(sql, sid))

    def test_a_callback_for_an_unseen_sid_is_recorded_for_the_calling_bot(self, client: FlaskClient, bot: Bot,
                                                                          other_bot: Bot, sql: Engine) -> None:
        """A callback may overtake the worker's write: an unknown SID is recorded for the bot that signed it."""
        sid = "SM" + uuid.uuid4().hex

        response = post_signed(client, status_callback(sid, "sent", BOT_ACCOUNT_SID, BOT_NUMBER), path=STATUS_PATH)

        assert (200, (bot.id, "sent")) == (response.status_code, delivery(sql, sid))


class TestDedupeScope:
    """Dedupe marks belong to one account."""

    def test_a_message_sid_seen_by_one_account_does_not_silence_another(self, client: FlaskClient, bot: Bot,
                                                                         other_bot: Bot,
                                                                         logs: list[dict[str, Any]]) -> None:
        """Bot A's request naming a MessageSid does not make bot B's message with that SID a duplicate."""
        # Given bot A's account has sent a request with some MessageSid
        first = inbound_params()
        post_signed(client, first)
        # When bot B's account receives a message with the same MessageSid
        second = {**first, "AccountSid": OTHER_ACCOUNT_SID, "To": OTHER_NUMBER}
        response = post_signed(client, second, token=OTHER_AUTH_TOKEN)
        # Then it is received, not dropped as a duplicate
        events = [(e["event"], e["bot_id"]) for e in logs if e["event"].startswith("inbound.")]
        assert (200, [("inbound.received", bot.id), ("inbound.received", other_bot.id)]) == (response.status_code,
                                                                                            events)
