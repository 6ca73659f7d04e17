"""Scoped API keys: an admin makes, lists and revokes them; each role reaches only its endpoints and bots."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from shared import deadletters, keys
from shared.bots import Bot, BotStore
from shared.db import get_engine, transaction
from shared.schema import api_keys
from shared.settings import Settings
from tests.conftest import BOT_ACCOUNT_SID, BOT_AUTH_TOKEN

APP = "/app:mammut-1"
PERSON = "+15551230001"
OTHER_NUMBER = "+15005550007"


@pytest.fixture
def other_bot(store: BotStore, bot: Bot) -> Bot:
    """A second bot of the same app, outside an operator's scope."""
    return store.create({"name": "other-bot", "twilio-account-sid": BOT_ACCOUNT_SID,
                         "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": OTHER_NUMBER})


def make_key(client: FlaskClient, admin_headers: dict[str, str], role: str, bots: list[int]) -> dict[str, Any]:
    response = client.post(f"{APP}/api-keys", headers=admin_headers, json={"name": f"{role} {bots}", "role": role,
                                                                            "bots": bots})
    assert 201 == response.status_code, response.get_json()
    return response.get_json()["data"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def credentials(client: FlaskClient, admin_headers: dict[str, str], bot: Bot,
                other_bot: Bot) -> dict[str, dict[str, str]]:
    """Each kind of caller's headers, in the order the table is walked (refusals first, so they change nothing)."""
    return {
        "nobody": {},
        "operator of bot 1": bearer(make_key(client, admin_headers, "operator", [bot.id])["key"]),
        "operator of all bots": bearer(make_key(client, admin_headers, "operator", [])["key"]),
        "admin key": bearer(make_key(client, admin_headers, "admin", [])["key"]),
        "admin token": admin_headers,
    }


@dataclass(frozen=True)
class Call:
    method: str
    path: str  # {b1}, {b2}, {person} and {spare} are filled in
    body: Any = None
    operator_of_bot_1: bool = False  # allowed to an operator scoped to bot 1
    operator_of_all: bool = False  # allowed to an operator of every bot (no bots named)


ADMIN_ONLY = dict(operator_of_bot_1=False, operator_of_all=False)
OPERATORS = dict(operator_of_bot_1=True, operator_of_all=True)
OTHER_BOTS = dict(operator_of_bot_1=False, operator_of_all=True)
BOT = APP + "/graph/user:{b1}"
BOT2 = APP + "/graph/user:{b2}"

TABLE = {
    "list bots": Call("GET", APP + "/graph/user", **OPERATORS),
    "create a bot": Call("POST", APP + "/graph/user", {"name": "x", "twilio-account-sid": BOT_ACCOUNT_SID,
                                                       "twilio-auth-token": BOT_AUTH_TOKEN,
                                                       "main-phone-number": "+15005550009"}, **ADMIN_ONLY),
    "show its bot": Call("GET", BOT, **OPERATORS),
    "show another bot": Call("GET", BOT2, **OTHER_BOTS),
    "change its bot's settings": Call("POST", BOT, {"fallback-message": "hi"}, **ADMIN_ONLY),
    "delete another bot": Call("DELETE", BOT2, **ADMIN_ONLY),
    "rotate the engine token": Call("POST", BOT + "/engine-token", **ADMIN_ONLY),
    "rotate the handoff secret": Call("POST", BOT + "/handoff-secret", **ADMIN_ONLY),
    "read its bot's messages": Call("GET", BOT + "/messages?with={person}", **OPERATORS),
    "read another bot's messages": Call("GET", BOT2 + "/messages?with={person}", **OTHER_BOTS),
    "list its bot's conversations": Call("GET", BOT + "/conversations", **OPERATORS),
    "list another bot's conversations": Call("GET", BOT2 + "/conversations", **OTHER_BOTS),
    "send as its bot": Call("POST", BOT + "/messages", {"to": "{person}", "text": "hola"}, **OPERATORS),
    "send as another bot": Call("POST", BOT2 + "/messages", {"to": "{person}", "text": "hola"}, **OTHER_BOTS),
    "pause its bot's conversation": Call("POST", BOT + "/conversations/{person}/handoff", **OPERATORS),
    "resume its bot's conversation": Call("DELETE", BOT + "/conversations/{person}/handoff", **OPERATORS),
    "pause another bot's conversation": Call("POST", BOT2 + "/conversations/{person}/handoff", **OTHER_BOTS),
    "erase a conversation": Call("DELETE", BOT + "/conversations/{person}", **ADMIN_ONLY),
    "list its bot's dead letters": Call("GET", BOT + "/dead-letters", **OPERATORS),
    "replay its bot's dead letters": Call("POST", BOT + "/dead-letters/replay", {"all": True}, **OPERATORS),
    "list another bot's dead letters": Call("GET", BOT2 + "/dead-letters", **OTHER_BOTS),
    "replay another bot's dead letters": Call("POST", BOT2 + "/dead-letters/replay", {"all": True}, **OTHER_BOTS),
    "read /metrics": Call("GET", "/metrics", **ADMIN_ONLY),
    "make an API key": Call("POST", APP + "/api-keys", {"name": "n", "role": "operator", "bots": []}, **ADMIN_ONLY),
    "list API keys": Call("GET", APP + "/api-keys", **ADMIN_ONLY),
    "revoke an API key": Call("DELETE", APP + "/api-keys/{spare}", **ADMIN_ONLY),
}


def _filled(value: Any, names: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return value.format(**names).replace("+", "%2B") if "?" in value else value.format(**names)
    if isinstance(value, dict):
        return {key: _filled(item, names) for key, item in value.items()}
    return value


@pytest.mark.parametrize("name", list(TABLE))
def test_each_role_reaches_only_its_endpoints_and_bots(
        name: str, client: FlaskClient, admin_headers: dict[str, str], bot: Bot, other_bot: Bot,
        credentials: dict[str, dict[str, str]]) -> None:
    """Nobody gets 401; an operator outside its role or bots gets 403; an admin (token or key) is let through."""
    call = TABLE[name]
    spare = make_key(client, admin_headers, "operator", [])["id"]
    names = {"b1": bot.id, "b2": other_bot.id, "person": PERSON, "spare": spare}
    expected = {"nobody": 401,
                "operator of bot 1": "allowed" if call.operator_of_bot_1 else 403,
                "operator of all bots": "allowed" if call.operator_of_all else 403,
                "admin key": "allowed", "admin token": "allowed"}
    actual = {}
    for caller, headers in credentials.items():
        response = client.open(_filled(call.path, names), method=call.method, headers=headers,
                               json=_filled(call.body, names))
        actual[caller] = response.status_code if response.status_code in (401, 403) else "allowed"
    assert expected == actual


def test_an_operator_lists_only_the_bots_it_may_reach(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, other_bot: Bot) -> None:
    """A key scoped to bot 1 sees bot 1 in the bot list, and not bot 2."""
    key = make_key(client, admin_headers, "operator", [bot.id])["key"]
    listed = client.get(f"{APP}/graph/user", headers=bearer(key)).get_json()["data"]["user"]
    assert [bot.id] == [entry["id"] for entry in listed]


def test_a_key_is_shown_once_listed_without_its_secret_and_kept_only_as_a_hash(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, settings: Settings) -> None:
    """The 201 carries the key; the list and the database never do."""
    made = make_key(client, admin_headers, "operator", [bot.id])
    listing = client.get(f"{APP}/api-keys", headers=admin_headers)
    with get_engine(settings).connect() as connection:
        [stored] = connection.execute(select(api_keys)).all()
    assert made["key"].startswith("msk_")
    assert [{"id": made["id"], "name": f"operator [{bot.id}]", "role": "operator", "bots": [bot.id]}] == [
        {k: v for k, v in entry.items() if k != "created-at"} for entry in listing.get_json()["data"]["api-keys"]]
    assert made["key"] not in listing.get_data(as_text=True)
    assert made["key"] not in str(tuple(stored))


def test_a_revoked_key_is_refused_with_its_next_request(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot) -> None:
    """DELETE takes effect at once: the very next call with the key answers 401."""
    made = make_key(client, admin_headers, "admin", [])
    before = client.get(f"{APP}/graph/user", headers=bearer(made["key"]))
    revoked = client.delete(f"{APP}/api-keys/{made['id']}", headers=admin_headers)
    after = client.get(f"{APP}/graph/user", headers=bearer(made["key"]))
    again = client.delete(f"{APP}/api-keys/{made['id']}", headers=admin_headers)
    assert (200, 200, 401, 404) == (before.status_code, revoked.status_code, after.status_code, again.status_code)


@pytest.mark.parametrize("body, field", [
    ({"name": "x", "role": "root", "bots": []}, "role"),
    ({"name": "x\u0000", "role": "operator", "bots": []}, "name"),
    ({"name": "x", "role": "operator", "bots": ["1"]}, "bots"),
    ({"name": "x", "role": "operator", "bots": [1.5]}, "bots"),
    ({"role": "operator"}, "name"),
    ({"name": "x", "role": "admin", "key": "mine"}, "key"),
])
def test_an_invalid_key_request_is_refused_naming_the_field(
        body: dict[str, Any], field: str, client: FlaskClient, admin_headers: dict[str, str], bot: Bot) -> None:
    """A role that is not admin or operator, a name with control characters, a missing name or an unknown field: 400."""
    response = client.post(f"{APP}/api-keys", headers=admin_headers, json=body)
    assert 400 == response.status_code
    assert field in response.get_json()["errors"]


def test_a_key_for_a_bot_that_does_not_exist_is_refused(client: FlaskClient, admin_headers: dict[str, str],
                                                          bot: Bot) -> None:
    """409: the request is well formed, the bot is not there."""
    response = client.post(f"{APP}/api-keys", headers=admin_headers, json={"name": "x", "role": "operator",
                                                                           "bots": [999]})
    assert (409, ["unknown bot ids"]) == (response.status_code, response.get_json()["errors"]["bots"])


def _dead_letter(bot_id: int, reply_id: str) -> dict[str, Any]:
    return {"id": reply_id, "bot_id": bot_id, "person": PERSON, "text": f"dead {reply_id}", "media_url": None,
            "error_code": 30003, "http_status": None, "error": "Unreachable destination handset",
            "reason": "exhausted", "attempts": 5, "failed_at": time.time()}


def test_an_operator_lists_and_replays_only_its_bots_dead_letters(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, other_bot: Bot, settings: Settings,
        redis: Any) -> None:
    """Bot 1's letter is listed and replayed through bot 1's path; bot 2's id given there is not replayed."""
    with transaction(get_engine(settings)) as connection:
        deadletters.record(connection, _dead_letter(bot.id, "r-mine"))
        deadletters.record(connection, _dead_letter(other_bot.id, "r-theirs"))
    headers = bearer(make_key(client, admin_headers, "operator", [bot.id])["key"])

    listed = client.get(f"{APP}/graph/user:{bot.id}/dead-letters", headers=headers).get_json()["data"]
    stolen = client.post(f"{APP}/graph/user:{bot.id}/dead-letters/replay", headers=headers,
                         json={"ids": ["r-theirs"]}).get_json()["data"]
    replayed = client.post(f"{APP}/graph/user:{bot.id}/dead-letters/replay", headers=headers,
                           json={"ids": ["r-mine"]}).get_json()["data"]

    assert ["r-mine"] == [entry["id"] for entry in listed["dead-letters"]]
    assert {"replayed": []} == stolen
    assert {"replayed": ["r-mine"]} == replayed
    assert 1 == redis.llen(keys.outbox(keys.conversation_id(bot.id, PERSON)))
    assert 0 == redis.llen(keys.outbox(keys.conversation_id(other_bot.id, PERSON)))
