"""Whatever a caller sends: never a 500, never a crash, never a traceback, nothing stored from a rejected request.

Hypothesis draws the input; Redis state and log events are checked inside each example (the
fixtures are function-scoped, so each example starts from what the previous one left and checks
its own change).
A crash is told from a refusal by its answer and its log event: Twilio's routes answer a crash
with a 503 too (so Twilio retries), but with their own body and a `twilio_route.crashed` event.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
import redis as redis_lib
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings, strategies as st
from twilio.request_validator import RequestValidator
from werkzeug.test import TestResponse

from shared import keys
from shared.bots import Bot
from tests.conftest import BOT_AUTH_TOKEN, BOT_NUMBER
from webhook.twilio_auth import INTERNAL_ERROR, UNAVAILABLE

EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
WEBHOOK = "http://localhost/channels/sms/"
# Counters of rejections are meant to change: that is the point of counting them.
_COUNTERS = frozenset({keys.METRIC_COUNTERS, keys.METRIC_HISTOGRAMS})
# What the catch-alls log: an exception nobody meant to raise (webhook/twilio_auth.py, webhook/errors.py).
CRASH_EVENTS = frozenset({"twilio_route.crashed", "request.failed"})
Logs = list[dict[str, Any]]
# What the webhook and the status callback require, for the forms that should get past that check.
REQUIRED = {"MessageSid": "SM" + "0" * 32, "From": "+15551230001", "To": "+15551230001", "MessageStatus": "delivered"}

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
twilio_names = st.sampled_from(["MessageSid", "AccountSid", "From", "To", "Body", "NumMedia", "NumSegments",
                                "MediaUrl0", "MediaContentType0", "OptOutType", "MessageStatus", "ErrorCode"])
forms = st.dictionaries(st.one_of(twilio_names, text), text, max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
bot_fields = st.sampled_from(["name", "user-type", "twilio-account-sid", "twilio-auth-token", "main-phone-number",
                              "engine-url", "messages-per-second", "fallback-message", "id", "slack-bot-token"])
near_bots = st.dictionaries(st.one_of(bot_fields, text), json_values, max_size=8)


def _state(redis: redis_lib.Redis) -> dict[str, Any]:
    """Every key but the counters, with its value, as bytes (a dedupe mark's field is a binary digest)."""
    pool = redis_lib.ConnectionPool(**{**redis.connection_pool.connection_kwargs, "decode_responses": False})
    raw = redis_lib.Redis(connection_pool=pool)
    state: dict[str, Any] = {}
    try:
        for key in raw.keys("*"):
            if key.decode() in _COUNTERS:
                continue
            kind = raw.type(key).decode()
            state[key] = {"string": raw.get, "hash": raw.hgetall, "set": raw.smembers,
                          "zset": lambda k: raw.zrange(k, 0, -1),
                          "list": lambda k: raw.lrange(k, 0, -1)}.get(kind, lambda k: kind)(key)
    finally:
        pool.disconnect()
    return state


def _check(response: TestResponse, before: dict[str, Any], redis: redis_lib.Redis, logs: Logs) -> None:
    """A deliberate answer: below 500, or the 503 of an unreachable Redis; never a crash's answer or event."""
    body = response.get_data(as_text=True)
    assert [] == [event for event in logs if event["event"] in CRASH_EVENTS]
    assert response.status_code < 500 or (response.status_code, body) == (503, UNAVAILABLE)
    assert "Traceback" not in body and 'File "' not in body and INTERNAL_ERROR not in body
    if response.status_code >= 400:
        assert before == _state(redis)


def _signed(form: dict[str, str], token: str = BOT_AUTH_TOKEN, url: str = WEBHOOK) -> dict[str, str]:
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url, form)}


@EXAMPLES
@given(form=forms)
def test_unsigned_forms_at_the_webhook(client: FlaskClient, redis: redis_lib.Redis, bot: Bot,
                                       form: dict[str, str], logs: Logs) -> None:
    """Arbitrary forms without a signature, some aimed at a real bot's number."""
    form = {**form, "To": BOT_NUMBER} if "To" in form else form
    before = _state(redis)
    logs.clear()  # this example's events only
    response = client.post("/channels/sms/", data=form)
    _check(response, before, redis, logs)
    assert response.status_code != 200


@EXAMPLES
@given(form=forms, account=st.booleans(), status_route=st.booleans(), complete=st.booleans(),
       real_sender=st.booleans())
def test_signed_forms_at_the_webhook_and_status_callback(client: FlaskClient, redis: redis_lib.Redis, bot: Bot,
                                                        form: dict[str, str], account: bool, status_route: bool,
                                                        complete: bool, real_sender: bool, logs: Logs) -> None:
    """Correctly signed forms with arbitrary fields, some with every required one: refused cleanly, or accepted."""
    path = "/channels/sms/status" if status_route else "/channels/sms/"
    form = {**form, "To" if not status_route else "From": BOT_NUMBER}
    if account:
        form["AccountSid"] = bot.account_sid
    if complete:  # past the 400 for a missing field, into the route's own reading of the other fields
        form.update({name: value for name, value in REQUIRED.items() if not form.get(name)})
    if real_sender and not status_route:  # past the 400 for a sender Twilio never sends, into the media and counts
        form["From"] = REQUIRED["From"]
    before = _state(redis)
    logs.clear()  # this example's events only
    response = client.post(path, data=form, headers=_signed(form, url="http://localhost" + path))
    _check(response, before, redis, logs)


@EXAMPLES
@given(body=st.one_of(json_values, near_bots).map(json.dumps), update=st.booleans())
def test_arbitrary_json_at_the_registry(client: FlaskClient, redis: redis_lib.Redis, bot: Bot,
                                        admin_headers: dict[str, str], body: str, update: bool, logs: Logs) -> None:
    """Create and update with any JSON, near-valid bots included."""
    path = f"/app:mammut-1/graph/user:{bot.id}" if update else "/app:mammut-1/graph/user"
    before = _state(redis)
    logs.clear()  # this example's events only
    response = client.post(path, data=body, content_type="application/json", headers=admin_headers)
    _check(response, before, redis, logs)


@EXAMPLES
@given(pairs=st.lists(st.tuples(st.one_of(bot_fields, text), text), max_size=6), raw=text,
       route=st.sampled_from(["user:{id}", "user:{id}/messages", "user", "user:x{id}", "user:{id}0"]))
def test_arbitrary_query_strings_at_the_registry(client: FlaskClient, redis: redis_lib.Redis, bot: Bot,
                                                 admin_headers: dict[str, str], pairs: list[tuple[str, str]],
                                                 raw: str, route: str, logs: Logs) -> None:
    """The seed's query-string updates, and reads, with any names, values and raw garbage."""
    query = "&".join(f"{quote(name)}={quote(value)}" for name, value in pairs) + quote(raw, safe="=&;\"+")
    path = f"/app:mammut-1/graph/{route.format(id=bot.id)}?{query}"
    for method in (client.get, client.post):
        before = _state(redis)
        logs.clear()
        _check(method(path, headers=admin_headers), before, redis, logs)


def test_a_create_refused_for_a_taken_number_stores_nothing(client: FlaskClient, redis: redis_lib.Redis, bot: Bot,
                                                             admin_headers: dict[str, str], logs: Logs) -> None:
    """A valid bot whose number is taken is refused with 409 and leaves Redis as it was."""
    fields = {"user-type": "machine", "name": "copy", "twilio-account-sid": bot.account_sid,
              "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": BOT_NUMBER}
    before = _state(redis)
    response = client.post("/app:mammut-1/graph/user", json=fields, headers=admin_headers)
    assert 409 == response.status_code
    _check(response, before, redis, logs)


def test_a_crash_in_a_twilio_route_is_answered_unlike_a_refusal(client: FlaskClient, bot: Bot,
                                                                monkeypatch: pytest.MonkeyPatch, logs: Logs) -> None:
    """An exception nobody meant to raise gets a 503 Twilio retries, with a body and a log event of its own."""
    # Given a webhook whose handling raises where nothing should
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("webhook.inbound.inbound_message", broken)
    form = {"MessageSid": "SM" + "0" * 32, "AccountSid": bot.account_sid, "From": "+15551230001", "To": BOT_NUMBER}
    # When Twilio posts a valid, signed message
    response = client.post("/channels/sms/", data=form, headers=_signed(form))
    # Then the answer and the log say "crash", not "Redis unavailable" nor a refusal
    assert (503, INTERNAL_ERROR) == (response.status_code, response.get_data(as_text=True))
    assert ["twilio_route.crashed"] == [event["event"] for event in logs if event["event"] in CRASH_EVENTS]


@pytest.mark.parametrize("count", ["abc", "1.5", "-3", "٣", "３", " ", "9" * 30])
@pytest.mark.parametrize("field", ["NumMedia", "NumSegments"])
def test_a_count_that_is_not_a_whole_number_is_read_as_its_default(client: FlaskClient, redis: redis_lib.Redis,
                                                                   bot: Bot, logs: Logs, field: str,
                                                                   count: str) -> None:
    """Twilio's counts are the caller's word: a signed message with a nonsense count is accepted, never a crash."""
    form = {"MessageSid": "SM" + "1" * 32, "AccountSid": bot.account_sid, "From": "+15551230001", "To": BOT_NUMBER,
            "Body": "hola", field: count}
    response = client.post("/channels/sms/", data=form, headers=_signed(form))
    assert 200 == response.status_code, response.get_data(as_text=True)
    assert [] == [event for event in logs if event["event"] in CRASH_EVENTS]
