"""The bot registry API, through HTTP, as a bot operator (or Mammut's own API client) uses it."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import redis as redis_lib
import requests
import structlog
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event, select

from shared.bots import BotStore
from shared.schema import bots
from tests.conftest import ADMIN_TOKEN, BOT_ACCOUNT_SID
from tests.test_bot_store import FOREIGN_SLACK, eventually
from tests.test_signature import inbound_params, post_signed

USERS = "/app:mammut-1/graph/user"
OTHER_SID = "AC" + "fedcba9876543210" * 2


def seed_body(**overrides: Any) -> dict[str, Any]:
    """The body of the seed's registration example, corrected."""
    body = {
        "user-type": "machine",
        "name": "Support bot",
        "twilio-account-sid": BOT_ACCOUNT_SID,
        "twilio-auth-token": "primary-auth-token-1234",
        "main-phone-number": "+11234567890",
    }
    body.update(overrides)
    return body


def create(client: FlaskClient, headers: dict[str, str], **overrides: Any) -> int:
    response = client.post(USERS, json=seed_body(**overrides), headers=headers)
    assert 200 == response.status_code, response.json
    return response.json["taskResult"][0]["affectedElementId"]


class TestAuthentication:
    """Every registry call needs the admin bearer token."""

    @pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic dGVzdDp0ZXN0", "Bearer "])
    def test_calls_without_the_admin_token_are_refused(self, client: FlaskClient, header: str | None) -> None:
        """No token, a wrong token or another scheme is answered 401, and nothing is created."""
        headers = {"Authorization": header} if header else {}

        response = client.post(USERS, json=seed_body(), headers=headers)

        assert 401 == response.status_code
        assert "Failed" == response.json["status"]
        assert "Bearer" == response.headers["WWW-Authenticate"]
        assert 401 == client.get(USERS + ":1", headers=headers).status_code

    def test_an_unknown_application_is_not_found(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """Only APP_ID's paths exist; another application name answers 404."""
        response = client.post("/app:someone-else/graph/user", json=seed_body(), headers=admin_headers)

        assert 404 == response.status_code
        assert "someone-else" in response.json["message"]


class TestRegistering:
    """POST /app:<app>/graph/user registers a machine user with its Twilio number."""

    def test_registering_answers_a_task_result_with_the_new_id(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """The answer is Mammut's TaskResult, with a positive integer id that reads back."""
        response = client.post(USERS, json=seed_body(), headers=admin_headers)

        assert 200 == response.status_code
        assert "Success" == response.json["status"]
        result = response.json["taskResult"][0]
        assert "user" == result["affectedElementName"]
        assert isinstance(result["affectedElementId"], int) and result["affectedElementId"] > 0
        shown = client.get(f"{USERS}:{result['affectedElementId']}", headers=admin_headers).json["data"]["user"][0]
        assert {"id": result["affectedElementId"], "name": "Support bot", "user-type": "machine",
                "twilio-account-sid": BOT_ACCOUNT_SID, "main-phone-number": "+11234567890"}.items() <= shown.items()
        assert 1.0 == shown["messages-per-second"]

    def test_optional_and_unknown_user_fields_are_kept(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """engine-url, messages-per-second, fallback-message and other user fields come back as given."""
        bot_id = create(client, admin_headers, **{
            "engine-url": "http://rasa.internal:5005/webhooks/rest/webhook", "messages-per-second": 3,
            "fallback-message": "Sorry, try again later.", "language": "es", "timezone": "America/Caracas",
        })

        shown = client.get(f"{USERS}:{bot_id}", headers=admin_headers).json["data"]["user"][0]

        assert "http://rasa.internal:5005/webhooks/rest/webhook" == shown["engine-url"]
        assert 3.0 == shown["messages-per-second"]
        assert "Sorry, try again later." == shown["fallback-message"]
        assert ("es", "America/Caracas") == (shown["language"], shown["timezone"])

    @pytest.mark.parametrize("number, stored", [
        ("+11234567890", "+11234567890"),
        ("+9032707719", "+9032707719"),
        ("+1 (123) 456-7890", "+11234567890"),
        ("+44 20 7946 0958", "+442079460958"),
    ])
    def test_numbers_are_stored_in_e164(self, client: FlaskClient, admin_headers: dict[str, str], number: str, stored: str) -> None:
        """The seed's own examples are accepted; spaces, dashes and parentheses are stripped."""
        bot_id = create(client, admin_headers, **{"main-phone-number": number})

        assert stored == client.get(f"{USERS}:{bot_id}", headers=admin_headers).json["data"]["user"][0]["main-phone-number"]

    def test_a_taken_number_is_a_conflict_naming_the_number(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """A phone number belongs to at most one bot."""
        create(client, admin_headers)

        response = client.post(USERS, json=seed_body(name="Copycat"), headers=admin_headers)

        assert 409 == response.status_code
        assert "+11234567890" in response.json["message"]

    def test_the_auth_token_is_stored_encrypted(self, app: Flask, client: FlaskClient, admin_headers: dict[str, str],
                                               redis: redis_lib.Redis, store: BotStore) -> None:
        """The plain token appears nowhere in Redis or the database, yet the store can still decrypt it for the workers."""
        bot_id = create(client, admin_headers)

        with app.extensions["mammut"].engine.connect() as connection:
            row = connection.execute(select(bots).where(bots.c.id == bot_id)).one()
        dump = json.dumps({key: redis.dump(key).hex() for key in redis.keys("sms:*")}) + repr(tuple(row))

        assert "primary-auth-token-1234" not in dump
        assert "primary-auth-token-1234".encode().hex() not in dump
        assert "primary-auth-token-1234" == store.get(bot_id).auth_token

    def test_two_registrations_of_one_number_at_once_make_one_bot(self, live_server: str, store: BotStore) -> None:
        """Two operators register the same number at the same moment: one gets the bot, the other a 409."""
        start = threading.Barrier(2)
        statuses: list[int] = []

        def register() -> None:
            start.wait()
            statuses.append(requests.post(live_server + USERS, json=seed_body(), timeout=30,
                                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code)

        threads = [threading.Thread(target=register) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert [200, 409] == sorted(statuses)
        assert ["+11234567890"] == [bot.number for bot in store.all()]


class TestBadInput:
    """Bad input gets a clear 4xx naming what is wrong, never a 500."""

    def test_the_seeds_malformed_example_says_where_the_json_breaks(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """The seed's example misses a comma; the answer gives the line and column."""
        body = '{\n  "user-type": "machine",\n  "name": "bot"\n  "slack-bot-token": "x"\n}'

        response = client.post(USERS, data=body, content_type="application/json", headers=admin_headers)

        assert 400 == response.status_code
        assert "malformed JSON at line 4 column 3" in response.json["message"]

    def test_slack_bot_token_in_place_of_the_twilio_token_is_explained(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """The seed's slip (slack-bot-token for twilio-auth-token) is named, with the right field."""
        body = seed_body(**{"slack-bot-token": "xoxb-1"})
        del body["twilio-auth-token"]

        response = client.post(USERS, json=body, headers=admin_headers)

        assert 400 == response.status_code
        assert "twilio-auth-token" in response.json["errors"]
        assert "twilio-auth-token" in response.json["errors"]["slack-bot-token"][0]

    @pytest.mark.parametrize("field, value", [
        ("user-type", "human"),
        ("user-type", None),
        ("twilio-account-sid", "AC123"),
        ("twilio-account-sid", 42),
        ("main-phone-number", "11234567890"),
        ("main-phone-number", "+0123456789"),
        ("main-phone-number", "+123456"),
        ("main-phone-number", "+1234567890123456"),
        ("main-phone-number", ["+11234567890"]),
        ("twilio-auth-token", ""),
        ("name", ""),
        ("messages-per-second", 0),
        ("messages-per-second", "fast"),
        ("engine-url", "ftp://example.com/"),
    ])
    def test_each_invalid_field_is_named(self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore,
                                         field: str, value: Any) -> None:
        """The 400 names the field at fault, and nothing is stored."""
        response = client.post(USERS, json=seed_body(**{field: value}), headers=admin_headers)

        assert 400 == response.status_code
        assert field in response.json["errors"]
        assert field in response.json["message"]
        assert [] == store.all()

    @pytest.mark.parametrize("body", ["[]", '"machine"', "null", "", "\xff\xfe"])
    def test_a_body_that_is_not_a_json_object_is_refused(self, client: FlaskClient, admin_headers: dict[str, str], body: str) -> None:
        """Lists, strings, null, nothing at all and undecodable bytes are each a 400."""
        response = client.post(USERS, data=body.encode("latin-1"), content_type="application/json", headers=admin_headers)

        assert 400 == response.status_code
        assert "Failed" == response.json["status"]

    def test_an_oversized_body_is_refused(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """Bodies over 64 KiB are answered 413 without being read into a bot."""
        body = seed_body(name="x" * 70_000)

        response = client.post(USERS, json=body, headers=admin_headers)

        assert 413 == response.status_code
        assert "Failed" == response.json["status"]


class TestUpdating:
    """POST /app:<app>/graph/user:<id> updates a bot, from the query string as in the seed, or from JSON."""

    def test_the_seeds_query_string_update_works_as_sent(self, client: FlaskClient, admin_headers: dict[str, str],
                                                         store: BotStore) -> None:
        """Quoted values and a raw '+' in the number (which form decoding would turn into a space) are read as meant."""
        bot_id = create(client, admin_headers)
        query = f'twilio-account-sid="{OTHER_SID}"&twilio-auth-token="AUTH_TOKEN_2"&main-phone-number="+9032707719"'

        response = client.post(f"{USERS}:{bot_id}?{query}", headers=admin_headers)

        assert 200 == response.status_code, response.json
        assert bot_id == response.json["taskResult"][0]["affectedElementId"]
        bot = store.get(bot_id)
        assert (OTHER_SID, "AUTH_TOKEN_2", "+9032707719") == (bot.account_sid, bot.auth_token, bot.number)

    def test_semicolons_unquoted_values_and_percent_encoding_work_too(self, client: FlaskClient, admin_headers: dict[str, str],
                                                                      store: BotStore) -> None:
        """`;` separates pairs as well as `&`; %2B is a plus; quotes are optional."""
        bot_id = create(client, admin_headers)

        response = client.post(f"{USERS}:{bot_id}?main-phone-number=%2B15551230000;name=Night+bot", headers=admin_headers)

        assert 200 == response.status_code, response.json
        assert ("+15551230000", "Night bot") == (store.get(bot_id).number, store.get(bot_id).name)

    def test_a_json_body_updates_too(self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore) -> None:
        """The same fields may come as a JSON object."""
        bot_id = create(client, admin_headers)

        response = client.post(f"{USERS}:{bot_id}", json={"messages-per-second": 10, "name": "Renamed"}, headers=admin_headers)

        assert 200 == response.status_code
        assert (10.0, "Renamed", "+11234567890") == (store.get(bot_id).messages_per_second, store.get(bot_id).name,
                                                     store.get(bot_id).number)

    def test_changing_the_number_moves_the_index(self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore) -> None:
        """After a number change the old number finds no bot and the new one finds this bot."""
        bot_id = create(client, admin_headers)

        client.post(f"{USERS}:{bot_id}?main-phone-number=+15557654321", headers=admin_headers)

        assert store.by_number("+11234567890") is None
        assert bot_id == store.by_number("+15557654321").id

    def test_taking_another_bots_number_is_a_conflict(self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore) -> None:
        """An update cannot steal a number; both bots keep theirs."""
        first = create(client, admin_headers)
        second = create(client, admin_headers, **{"main-phone-number": "+15550000002"})

        response = client.post(f"{USERS}:{second}?main-phone-number=+11234567890", headers=admin_headers)

        assert 409 == response.status_code
        assert "+11234567890" in response.json["message"]
        assert (first, second) == (store.by_number("+11234567890").id, store.by_number("+15550000002").id)

    @pytest.mark.parametrize("path", [":999", ":abc", ":0", ":-1"])
    def test_an_unknown_bot_is_not_found(self, client: FlaskClient, admin_headers: dict[str, str], path: str) -> None:
        """Ids that are not a registered positive integer answer 404."""
        assert 404 == client.post(f"{USERS}{path}?name=x", headers=admin_headers).status_code
        assert 404 == client.get(f"{USERS}{path}", headers=admin_headers).status_code
        assert 404 == client.delete(f"{USERS}{path}", headers=admin_headers).status_code

    def test_an_invalid_update_changes_nothing(self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore) -> None:
        """A bad number in an update is a 400 naming it, and the bot is left as it was."""
        bot_id = create(client, admin_headers)

        response = client.post(f'{USERS}:{bot_id}?main-phone-number="12345"&name=changed', headers=admin_headers)

        assert 400 == response.status_code
        assert "main-phone-number" in response.json["errors"]
        assert ("+11234567890", "Support bot") == (store.get(bot_id).number, store.get(bot_id).name)

    def test_an_empty_update_is_refused(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """Neither query nor body: a 400 saying there is nothing to update."""
        bot_id = create(client, admin_headers)

        response = client.post(f"{USERS}:{bot_id}", headers=admin_headers)

        assert 400 == response.status_code
        assert "nothing to update" in response.json["message"]


class TestReadingAndDeleting:
    """GET shows a bot (never its token); DELETE removes it and its number."""

    def test_both_read_paths_show_the_bot_without_its_token(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """/graph/user:<id> and /graph:<depth>/user:<id> answer the same user, and no token is in either."""
        bot_id = create(client, admin_headers)

        plain = client.get(f"{USERS}:{bot_id}", headers=admin_headers)
        deep = client.get(f"/app:mammut-1/graph:3/user:{bot_id}", headers=admin_headers)

        assert plain.json == deep.json
        assert "Success" == plain.json["status"]
        assert "primary-auth-token-1234" not in plain.get_data(as_text=True)
        assert "twilio-auth-token" not in plain.json["data"]["user"][0]

    def test_listing_shows_every_bot_without_tokens(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """GET /graph/user lists the registered bots, oldest first."""
        first = create(client, admin_headers)
        second = create(client, admin_headers, **{"main-phone-number": "+15550000002"})

        response = client.get(USERS, headers=admin_headers)

        assert [first, second] == [user["id"] for user in response.json["data"]["user"]]
        assert "primary-auth-token-1234" not in response.get_data(as_text=True)

    def test_deleting_frees_the_number(self, client: FlaskClient, admin_headers: dict[str, str], store: BotStore) -> None:
        """After DELETE the bot is gone, its number resolves to nothing and can be registered again."""
        bot_id = create(client, admin_headers)

        response = client.delete(f"{USERS}:{bot_id}", headers=admin_headers)

        assert 200 == response.status_code
        assert 404 == client.get(f"{USERS}:{bot_id}", headers=admin_headers).status_code
        assert store.by_number("+11234567890") is None
        create(client, admin_headers)

    def test_the_token_is_never_logged(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """Registering and updating log events, none of which carries the auth token."""
        with structlog.testing.capture_logs() as logs:
            bot_id = create(client, admin_headers)
            client.post(f'{USERS}:{bot_id}?twilio-auth-token="second-secret-token"', headers=admin_headers)

        # Only the registry's events: an earlier test's bot-cache listener thread may log meanwhile.
        registry_events = [entry["event"] for entry in logs if entry["event"].startswith("registry.")]
        assert ["registry.created", "registry.updated"] == registry_events
        assert "primary-auth-token-1234" not in repr(logs)
        assert "second-secret-token" not in repr(logs)


class TestTheWebhookSeesTheRegistry:
    """The webhook finds bots through its in-process cache: current after every change, and cheap for strangers."""

    @pytest.fixture
    def listening(self, app: Flask, client: FlaskClient) -> None:
        """The app's bot cache is subscribed to registry changes (so it keeps what it reads)."""
        post_signed(client, inbound_params(To="+15550000009"))  # the first lookup starts its listener
        assert eventually(lambda: app.extensions["mammut"].bots.listening)

    def test_a_number_change_reaches_the_webhook_at_once(self, client: FlaskClient, admin_headers: dict[str, str],
                                                         listening: None) -> None:
        """Right after an update moves a bot's number, the old number is unknown and the new one is answered."""
        bot_id = create(client, admin_headers)
        token = seed_body()["twilio-auth-token"]
        assert 200 == post_signed(client, inbound_params(To="+11234567890"), token=token).status_code  # now cached
        assert 404 == post_signed(client, inbound_params(To="+15557654321"), token=token).status_code  # and this

        client.post(f"{USERS}:{bot_id}?main-phone-number=+15557654321", headers=admin_headers)

        assert 404 == post_signed(client, inbound_params(To="+11234567890"), token=token).status_code
        assert 200 == post_signed(client, inbound_params(To="+15557654321"), token=token).status_code

    def test_the_registry_survives_a_redis_flush(self, app: Flask, client: FlaskClient, admin_headers: dict[str, str],
                                                 redis: redis_lib.Redis) -> None:
        """Redis emptied: the bot is still listed, shown and answered on its number."""
        bot_id = create(client, admin_headers)

        # FLUSHDB rather than FLUSHALL: the test server may hold other runs' databases, and this
        # database is all of this service's Redis.
        redis.flushdb()
        app.extensions["mammut"].bots.clear()  # as after a restart: nothing in memory either

        assert [bot_id] == [user["id"] for user in client.get(USERS, headers=admin_headers).json["data"]["user"]]
        assert 200 == client.get(f"{USERS}:{bot_id}", headers=admin_headers).status_code
        token = seed_body()["twilio-auth-token"]
        assert 200 == post_signed(client, inbound_params(To="+11234567890"), token=token).status_code

    def test_webhooks_to_an_unknown_number_do_not_query_the_database_each(self, app: Flask, client: FlaskClient,
                                                                          listening: None) -> None:
        """Fifty webhooks to a number no bot has are all 404, for at most a query or two between them."""
        queries: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if not statement.startswith("BEGIN"):  # SQLite opens every transaction with one
                queries.append(statement)

        engine = app.extensions["mammut"].engine
        event.listen(engine, "before_cursor_execute", count)
        try:
            statuses = {post_signed(client, inbound_params(To="+15550000404")).status_code for _ in range(50)}
        finally:
            event.remove(engine, "before_cursor_execute", count)

        assert {404} == statuses
        assert len(queries) <= 1 + FOREIGN_SLACK


class TestMessageLog:
    """GET /graph/user:<id>/messages?with=<E.164> reads one conversation's log."""

    def test_the_with_parameter_is_required_and_must_be_e164(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """Missing or malformed `with` is a 400 that says what it wants."""
        bot_id = create(client, admin_headers)

        missing = client.get(f"{USERS}:{bot_id}/messages", headers=admin_headers)
        malformed = client.get(f"{USERS}:{bot_id}/messages?with=12", headers=admin_headers)

        assert (400, 400) == (missing.status_code, malformed.status_code)
        assert "with" in missing.json["message"]

    def test_a_raw_plus_in_with_is_read_as_plus(self, client: FlaskClient, admin_headers: dict[str, str]) -> None:
        """?with=+1555... (unencoded) reads the same conversation as ?with=%2B1555...."""
        bot_id = create(client, admin_headers)

        raw = client.get(f"{USERS}:{bot_id}/messages?with=+15551234567", headers=admin_headers)
        encoded = client.get(f"{USERS}:{bot_id}/messages?with=%2B15551234567", headers=admin_headers)

        assert (200, 200) == (raw.status_code, encoded.status_code)
        assert raw.json == encoded.json == {"status": "Success", "data": {"messages": [], "next": None,
                                                                     "handoff": {"paused": False}}}
