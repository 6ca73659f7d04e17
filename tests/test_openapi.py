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
