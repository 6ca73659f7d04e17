"""GET /openapi.json: a valid OpenAPI 3 document of every route, generated from the marshmallow schemas."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from shared.schemas import BotSchema
from webhook.openapi import documented, openapi_path


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert 200 == response.status_code
    return response.get_json()


def test_every_route_of_the_app_is_described(app: Flask, document: dict[str, Any]) -> None:
    """No route is missing: each (path, method) the app serves has an operation."""
    served = {
        (openapi_path(rule.rule), method.lower())
        for rule in app.url_map.iter_rules() if documented(rule.endpoint)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    described = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert served == described


def test_the_bot_schema_is_generated_from_the_marshmallow_schema(document: dict[str, Any]) -> None:
    """Every field of BotSchema, under its API name, with its validation (the auth token write-only)."""
    bot = document["components"]["schemas"]["Bot"]
    assert {field.data_key or name for name, field in BotSchema().fields.items()} == set(bot["properties"])
    assert bot["properties"]["twilio-account-sid"]["pattern"] == "^AC[0-9a-fA-F]{32}$"
    assert bot["properties"]["twilio-auth-token"]["writeOnly"] is True
    assert {"name", "user-type", "twilio-account-sid", "twilio-auth-token"} == set(bot["required"])
    # A bot needs a number or a messaging service (or both).
    assert [{"required": ["main-phone-number"], "properties": {"main-phone-number": {"type": "string"}}},
            {"required": ["twilio-messaging-service-sid"],
             "properties": {"twilio-messaging-service-sid": {"type": "string"}}}] == bot["anyOf"]
    assert bot["properties"]["twilio-messaging-service-sid"]["pattern"] == "^MG[0-9a-fA-F]{32}$"
    assert {"phone-numbers", "validity-period", "smart-encoded", "shorten-urls"} <= set(bot["properties"])
    assert {"help-message", "opt-out-message", "opt-in-message", "keyword-set"} <= set(bot["properties"])
    assert (["array", "null"], "string") == (bot["properties"]["opt-out-keywords"]["type"],  # null: the default
                                   bot["properties"]["opt-out-keywords"]["items"]["type"])
    assert {"quiet-hours", "quiet-hours-time-zone"} <= set(bot["properties"])


def test_scheduled_sends_are_described(document: dict[str, Any]) -> None:
    """send_at on both ways of sending, and the scheduled list and its cancel."""
    scheduled = document["paths"]["/app:{app_id}/graph/user:{bot_id}/scheduled"]
    assert {"get"} <= set(scheduled)
    assert {"delete"} <= set(document["paths"]["/app:{app_id}/graph/user:{bot_id}/scheduled/{scheduled_id}"])
    callback_item = document["components"]["schemas"]["CallbackReply"]["properties"]["send_at"]
    assert {"$ref": "#/components/schemas/SendAt"} in callback_item["anyOf"]
    # The days it names are inside the window the service takes (5 minutes ago to 30 days ahead).
    pattern = re.compile(document["components"]["schemas"]["SendAt"]["pattern"])
    now = datetime.now(timezone.utc)
    assert pattern.search((now + timedelta(days=10)).isoformat(timespec="seconds"))
    assert pattern.search((now + timedelta(days=10)).strftime("%Y-%m-%dT09:00:00-06:00"))
    assert not pattern.search((now - timedelta(days=1)).isoformat(timespec="seconds"))
    assert not pattern.search((now + timedelta(days=31)).isoformat(timespec="seconds"))


def test_registry_routes_need_the_bearer_token_and_twilio_routes_a_signature(document: dict[str, Any]) -> None:
    """Security is declared per operation, as the routes enforce it."""
    assert {"type": "http", "scheme": "bearer"} == document["components"]["securitySchemes"]["bearerAuth"]
    create = document["paths"]["/app:{app_id}/graph/user"]["post"]
    webhook = document["paths"]["/channels/sms/"]["post"]
    assert [{"bearerAuth": []}] == create["security"]
    assert [{"twilioSignature": []}] == webhook["security"]
    assert {"$ref": "#/components/schemas/Bot"} == create["requestBody"]["content"]["application/json"]["schema"]
    assert "text/xml" in webhook["responses"]["200"]["content"]


def test_path_parameters_and_operation_ids_are_well_formed(document: dict[str, Any]) -> None:
    """Each {name} in a path is a required path parameter, and operation ids are unique."""
    ids = []
    for path, operations in document["paths"].items():
        for operation in operations.values():
            ids.append(operation["operationId"])
            declared = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
            assert {part[1:-1] for part in path.replace(":", "/").split("/") if part.startswith("{")} == declared
    assert len(ids) == len(set(ids))
    assert "3.1.0" == document["openapi"]


# Where the schema and the server could disagree: each case a fuzzer found, checked both ways.

def _update(client: FlaskClient, headers: dict[str, str], bot_id: int, body: dict[str, Any]) -> int:
    return client.post(f"/app:mammut-1/graph/user:{bot_id}", headers=headers, json=body).status_code


@pytest.mark.parametrize(("field", "refused", "taken"), [
    ("name", "\u0005", "\u0005Citas"),  # control characters are removed: nothing may be left
    ("help-message", "\u0007\u001b", "\tAyuda"),  # a tab is kept
])
def test_a_text_of_only_control_characters_is_refused_by_the_schema_and_the_server(
        client: FlaskClient, admin_headers: dict[str, str], bot: Any, document: dict[str, Any],
        field: str, refused: str, taken: str) -> None:
    """A 400 for what the schema refuses, a 200 for what it allows (schemathesis: schema-valid data refused)."""
    pattern = re.compile(document["components"]["schemas"]["BotUpdate"]["properties"][field]["pattern"])
    assert (None, True) == (pattern.search(refused), bool(pattern.search(taken)))
    assert (400, 200) == (_update(client, admin_headers, bot.id, {field: refused}),
                          _update(client, admin_headers, bot.id, {field: taken}))


@pytest.mark.parametrize("field", ["help-keywords", "opt-out-keywords", "phone-numbers"])
def test_a_list_field_given_a_string_in_json_is_refused(client: FlaskClient, admin_headers: dict[str, str],
                                                        bot: Any, document: dict[str, Any], field: str) -> None:
    """In a JSON body a list is a list: "AYUDA,SOCORRO" is for the seed's query string only."""
    assert "string" not in document["components"]["schemas"]["BotUpdate"]["properties"][field]["type"]
    assert 400 == _update(client, admin_headers, bot.id, {field: "AYUDA,SOCORRO"})
    query = client.post(f'/app:mammut-1/graph/user:{bot.id}?help-keywords="AYUDA, SOCORRO,"', headers=admin_headers)
    assert (200, ["AYUDA", "SOCORRO"]) == (query.status_code, client.get(
        f"/app:mammut-1/graph/user:{bot.id}", headers=admin_headers).get_json()["data"]["user"][0]["help-keywords"])


@pytest.mark.parametrize(("path", "body"), [
    ("/conversations/+15551230001/handoff", {"note": "\u0007" + "n" * 1000}),
    ("/messages", {"to": "+15551230001", "text": "\u0007" + "t" * 16_000}),
])
def test_a_length_bound_holds_for_the_text_as_sent(client: FlaskClient, admin_headers: dict[str, str], bot: Any,
                                                   document: dict[str, Any], path: str, body: dict[str, Any]) -> None:
    """A text one character over its bound is refused even when that character is one the service removes:
    the schema's maxLength counts what was sent (schemathesis: schema-violating request accepted)."""
    response = client.post(f"/app:mammut-1/graph/user:{bot.id}{path}", headers=admin_headers, json=body)
    assert 400 == response.status_code, response.get_data(as_text=True)


def test_a_callback_text_of_only_control_characters_is_nothing_to_send_by_the_schema_too(
        client: FlaskClient, admin_headers: dict[str, str], bot: Any, document: dict[str, Any]) -> None:
    """"\\u0097" is no text once cleaned: the server refuses it, and so does the schema's pattern."""
    [with_text, _] = document["components"]["schemas"]["CallbackReply"]["anyOf"]
    pattern = re.compile(with_text["properties"]["text"]["pattern"])
    assert (None, True) == (pattern.search("\u0097"), bool(pattern.search("\u0097\t")))
    refused = client.post(f"/channels/sms/callback/{bot.id}", headers=admin_headers,
                          json={"recipient_id": "+15551230001", "text": "\u0097"})
    assert 400 == refused.status_code


def test_send_at_null_is_now_in_the_schema_as_on_the_server(client: FlaskClient, admin_headers: dict[str, str],
                                                            bot: Any, document: dict[str, Any]) -> None:
    """An operator's message with "send_at": null goes now; the schema says null is allowed."""
    body = document["paths"]["/app:{app_id}/graph/user:{bot_id}/messages"]["post"]["requestBody"]
    send_at = body["content"]["application/json"]["schema"]["properties"]["send_at"]
    assert {"type": "null"} in send_at["anyOf"]
    response = client.post(f"/app:mammut-1/graph/user:{bot.id}/messages", headers=admin_headers,
                           json={"to": "+15551230001", "text": "hola", "send_at": None})
    assert 202 == response.status_code, response.get_data(as_text=True)


def test_every_operation_documents_gunicorns_414(document: dict[str, Any]) -> None:
    """A path and query past gunicorn's request line are answered 414 before the app sees them."""
    assert all("414" in operation["responses"] for operations in document["paths"].values()
               for operation in operations.values())


@pytest.mark.parametrize(("media", "status"), [("https://nI0.4590.hc*", 400), ("https://img.example/a.png?w=2", 202),
                                               ("https://img.example:8443/a.png", 400)])
def test_an_operators_media_url_is_held_to_the_schemas_pattern(client: FlaskClient, admin_headers: dict[str, str],
                                                               bot: Any, document: dict[str, Any], media: str,
                                                               status: int) -> None:
    """What the schema's pattern refuses (a host with "*", a port), the server refuses; what it allows is queued."""
    body = document["paths"]["/app:{app_id}/graph/user:{bot_id}/messages"]["post"]["requestBody"]
    pattern = body["content"]["application/json"]["schema"]["properties"]["media-url"]["pattern"]
    assert (status == 202) == bool(re.search(pattern, media))
    response = client.post(f"/app:mammut-1/graph/user:{bot.id}/messages", headers=admin_headers,
                           json={"to": "+15551230001", "media-url": media})
    assert status == response.status_code, response.get_data(as_text=True)


def test_shorten_urls_null_without_a_service_is_valid_by_the_schema_as_on_the_server(
        client: FlaskClient, admin_headers: dict[str, str], document: dict[str, Any]) -> None:
    """null is the default (no shortening): the rule "shorten-urls needs a service" allows it."""
    [rule] = document["components"]["schemas"]["Bot"]["allOf"]
    assert None in rule["anyOf"][0]["properties"]["shorten-urls"]["enum"]
    response = client.post("/app:mammut-1/graph/user", headers=admin_headers, json={
        "user-type": "machine", "name": "Citas", "twilio-account-sid": "AC" + "1" * 32, "twilio-auth-token": "t" * 32,
        "main-phone-number": "+15551139998", "shorten-urls": None, "twilio-messaging-service-sid": None})
    assert 200 == response.status_code, response.get_data(as_text=True)
