"""The webhook's fast path (webhook/fastinbound.py): a text in Twilio's shape is answered without
Flask, exactly as the route would answer it, and everything else still reaches the route."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
import redis as redis_lib
import werkzeug.urls  # noqa: F401 - registers the error handler werkzeug reads forms with
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given, settings as hypothesis_settings, strategies as st
from urllib.parse import parse_qsl
from werkzeug.datastructures import MultiDict

from shared import jsonio, keys
from shared.bots import Bot
from shared.settings import Settings
from tests.test_inbound import counter, inbox
from tests.test_signature import INBOUND_PATH, LOCAL, inbound_params, post_signed, sign
from webhook import create_app, inbound
from webhook import MAX_BODY_BYTES
from webhook.fastinbound import URLS_KEPT, FastInbound, pairs
from webhook.twilio_auth import EMPTY_TWIML

# What the fast path leaves to werkzeug: the same form, spelled so that only Flask reads it.
ROUTE_ONLY = "application/x-www-form-urlencoded;charset=UTF-8"


def post_form(client: FlaskClient, params: dict[str, str], content_type: str = "application/x-www-form-urlencoded",
              signed_as: str | None = None, base_url: str = LOCAL, **headers: str) -> Any:
    url = signed_as or LOCAL + INBOUND_PATH
    return client.post(INBOUND_PATH, data=urlencode(params), content_type=content_type, base_url=base_url,
                       headers={"X-Twilio-Signature": sign(url, params), **headers})


@pytest.fixture
def route_calls(app: Flask) -> list[str]:
    """The Flask route's calls, counted: the fast path answers a text without it."""
    return count_route_calls(app)


def count_route_calls(app: Flask) -> list[str]:
    calls: list[str] = []
    view = app.view_functions["inbound.receive"]

    def counted() -> Any:
        calls.append("route")
        return view()

    app.view_functions["inbound.receive"] = counted
    return calls


class TestSameAnswer:
    """Whoever answers, Twilio, the workers, the metrics and the logs see the same thing."""

    def test_a_text_is_answered_without_the_route(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                  route_calls: list[str]) -> None:
        """Twilio's own Content-Type: acknowledged and queued, Flask's route never called."""
        params = inbound_params()
        response = post_signed(client, params)
        assert (200, EMPTY_TWIML, []) == (response.status_code, response.get_data(as_text=True), route_calls)
        assert [params["MessageSid"]] == [message["sid"] for message in inbox(redis)]

    def test_the_fast_path_and_the_route_answer_alike(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                      route_calls: list[str], logs: list[dict[str, Any]]) -> None:
        """Status, headers, body, the stored message, the count and the log line: all the same."""
        fields = {"Body": "¿Qué tal? STOP no", "NumMedia": "2", "MediaUrl0": "https://api.twilio.com/m/0",
                  "MediaContentType0": "image/png", "MediaUrl1": "https://api.twilio.com/m/1", "FromCity": "MADRID"}
        fast, slow = inbound_params(**fields), inbound_params(**fields)
        answers = [post_form(client, fast), post_form(client, slow, content_type=ROUTE_ONLY)]
        assert ["route"] == route_calls  # the second, and only the second, went through Flask
        assert 1 == len({(a.status_code, tuple(sorted(a.headers.items())), a.get_data()) for a in answers})
        stored = inbox(redis)
        for message in stored:
            message.pop("received_at")
            message.pop("sid")
        assert 2 == len(stored) and stored[0] == stored[1]
        assert 2 == counter(redis, "sms_inbound", result="accepted")
        received = [{k: v for k, v in event.items() if k != "message_sid"}
                    for event in logs if event["event"] == "inbound.received"]
        assert 2 == len(received) and received[0] == received[1]

    @pytest.mark.parametrize(("change", "status", "reason"), [
        ({"To": "+15005550009"}, 404, "unknown_number"),
        ({"MessageSid": ""}, 400, "missing_fields"),
        ({"From": "client:alice"}, 400, "bad_sender"),
        ({"AccountSid": "AC" + "f" * 32}, 403, "wrong_account"),
    ])
    def test_a_refusal_is_the_routes_with_its_body_put_back(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis, route_calls: list[str],
            logs: list[dict[str, Any]], change: dict[str, str], status: int, reason: str) -> None:
        """The route reads the same form again and refuses it with its own reason, log line and count."""
        response = post_signed(client, inbound_params(**change))
        assert (status, reason, ["route"]) == (response.status_code, response.get_data(as_text=True), route_calls)
        assert [reason] == [event["reason"] for event in logs if event["event"] == "inbound.rejected"]
        assert 1 == counter(redis, "sms_inbound", result="rejected", reason=reason)
        assert [] == redis.keys(keys.inbox("*"))

    def test_a_bad_signature_is_refused_by_the_route(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                    route_calls: list[str]) -> None:
        """Signed with another token: 403 bad_signature, nothing stored."""
        params = inbound_params()
        response = client.post(INBOUND_PATH, data=params,
                               headers={"X-Twilio-Signature": sign(LOCAL + INBOUND_PATH, params, token="f" * 32)})
        assert (403, "bad_signature", ["route"]) == (
            response.status_code, response.get_data(as_text=True), route_calls)
        assert [] == inbox(redis)

    def test_a_body_that_is_not_utf8_goes_to_the_route(self, client: FlaskClient, bot: Bot,
                                                      route_calls: list[str]) -> None:
        """The fast path reads no form from it; werkzeug decides, and the answer is never a 500."""
        response = client.post(INBOUND_PATH, data=b"From=%2B15551230001&To=%2B15005550006&MessageSid=SM1&Body=\xff",
                               content_type="application/x-www-form-urlencoded",
                               headers={"X-Twilio-Signature": "x"})
        assert response.status_code in (400, 403) and ["route"] == route_calls


class TestLeftToTheRoute:
    """What werkzeug judges (content types, sizes, framing) is still werkzeug's."""

    def test_a_plain_text_body_is_the_routes_to_refuse(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                       route_calls: list[str]) -> None:
        params = inbound_params()
        response = post_form(client, params, content_type="text/plain")
        assert (400, ["route"], []) == (response.status_code, route_calls, inbox(redis))

    def test_one_byte_past_the_limit_is_413_and_at_the_limit_is_answered(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis, route_calls: list[str]) -> None:
        def sized(total: int) -> dict[str, str]:
            params = inbound_params(Body="")
            params["Body"] = "x" * (total - len(urlencode(params)))
            assert total == len(urlencode(params))
            return params

        assert 200 == post_form(client, sized(MAX_BODY_BYTES)).status_code
        assert [] == route_calls
        assert 413 == post_form(client, sized(MAX_BODY_BYTES + 1)).status_code
        assert 1 == len(inbox(redis))

    def test_a_content_length_of_other_digits_is_the_routes(self, client: FlaskClient, bot: Bot,
                                                           route_calls: list[str]) -> None:
        """"²" is a digit to str.isdigit, not to HTTP: never a crash in front of Flask."""
        params = inbound_params()
        response = client.post(INBOUND_PATH, data=urlencode(params), content_type="application/x-www-form-urlencoded",
                               environ_overrides={"CONTENT_LENGTH": "\u00b2"},
                               headers={"X-Twilio-Signature": sign(LOCAL + INBOUND_PATH, params)})
        assert response.status_code < 500 and ["route"] == route_calls


class TestSignedUrl:
    """The URL checked is the one Twilio called, however many hosts the process has seen."""

    def test_each_host_is_checked_against_its_own_url(self, client: FlaskClient, bot: Bot,
                                                     redis: redis_lib.Redis) -> None:
        """Signed for a.example and sent there, then for b.example: both accepted; a.example's signature
        sent to b.example is refused, although a.example's URL was worked out first."""
        first, second, stolen = inbound_params(), inbound_params(), inbound_params()
        assert 200 == post_form(client, first, signed_as=f"http://a.example{INBOUND_PATH}",
                                Host="a.example").status_code
        assert 200 == post_form(client, second, signed_as=f"http://b.example{INBOUND_PATH}",
                                Host="b.example").status_code
        assert 403 == post_form(client, stolen, signed_as=f"http://a.example{INBOUND_PATH}",
                                Host="b.example").status_code
        assert [first["MessageSid"], second["MessageSid"]] == [message["sid"] for message in inbox(redis)]

    def test_forwarded_proto_and_host_make_the_url(self, client: FlaskClient, bot: Bot,
                                                   route_calls: list[str]) -> None:
        """Behind Heroku's router: signed over https://api.mammut.io, arriving as http; the same host
        called over plain http is signed over http. Both answered by the fast path."""
        forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.mammut.io"}
        plain = post_form(client, inbound_params(), signed_as=f"http://api.mammut.io{INBOUND_PATH}",
                          base_url="http://api.mammut.io")
        proxied = post_form(client, inbound_params(), signed_as=f"https://api.mammut.io{INBOUND_PATH}", **forwarded)
        params = inbound_params()
        with_query = client.post(INBOUND_PATH + "?bot=1", data=params, headers={
            "X-Twilio-Signature": sign("https://api.mammut.io/channels/sms/?bot=1", params), **forwarded})
        assert ([200, 200, 200], []) == ([plain.status_code, proxied.status_code, with_query.status_code], route_calls)
        # Signed with a query string that was not called: the route refuses it too.
        assert 403 == post_form(client, inbound_params(), signed_as="https://api.mammut.io/channels/sms/?bot=1",
                                **forwarded).status_code

    def test_made_up_hosts_never_grow_the_urls_kept(self, app: Flask, client: FlaskClient, bot: Bot) -> None:
        for number in range(2 * URLS_KEPT):
            post_form(client, inbound_params(), Host=f"h{number}.example")
        fast = app.wsgi_app.app.app  # ProxyFix -> ChunkedBodyLimit -> FastInbound
        assert isinstance(fast, FastInbound) and 0 < len(fast._urls) <= URLS_KEPT

    def test_public_url_wins_over_the_host(self, settings: Settings, bot: Bot) -> None:
        """With PUBLIC_URL, the URL is PUBLIC_URL + path + query whatever Host says."""
        app = create_app(settings.with_overrides(public_url="https://sms.example.com"))
        route_calls, client = count_route_calls(app), app.test_client()
        params = inbound_params()
        response = client.post(INBOUND_PATH + "?x=%20y", data=params, headers={
            "Host": "evil.example", "X-Twilio-Signature": sign("https://sms.example.com/channels/sms/?x=%20y", params)})
        assert (200, []) == (response.status_code, route_calls)
        again = inbound_params()
        response = post_form(client, again, Host="evil.example", signed_as=f"http://evil.example{INBOUND_PATH}")
        assert 403 == response.status_code


class TestFailures:
    """When the fast path cannot store a text it answers as the route does: 503, never an acknowledgement."""

    def test_redis_failing_is_503_unavailable_and_logged(self, client: FlaskClient, bot: Bot,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         logs: list[dict[str, Any]]) -> None:
        params = inbound_params()

        def down(*_args: Any, **_kwargs: Any) -> None:
            raise redis_lib.ConnectionError("Connection refused")

        monkeypatch.setattr(inbound, "take", down)
        response = post_signed(client, params)
        assert (503, "Service Unavailable", "text/plain; charset=utf-8") == (
            response.status_code, response.get_data(as_text=True), response.headers["Content-Type"])
        assert [(params["MessageSid"], "ConnectionError")] == [
            (event["message_sid"], event["error"]) for event in logs if event["event"] == "inbound.unavailable"]

    @pytest.mark.parametrize("error", [redis_lib.TimeoutError("Timeout reading from socket"),
                                       redis_lib.ResponseError("OOM command not allowed when used memory > 'maxmemory'"),
                                       redis_lib.ReadOnlyError("You can't write against a read only replica.")])
    def test_any_redis_error_is_503_unavailable(self, client: FlaskClient, bot: Bot, monkeypatch: pytest.MonkeyPatch,
                                                logs: list[dict[str, Any]], error: Exception) -> None:
        def failing(*_args: Any, **_kwargs: Any) -> None:
            raise error

        monkeypatch.setattr(inbound, "take", failing)
        response = post_signed(client, inbound_params())
        assert (503, "Service Unavailable") == (response.status_code, response.get_data(as_text=True))
        assert ["inbound.unavailable"] == [event["event"] for event in logs
                                           if event["event"] in ("inbound.unavailable", "twilio_route.crashed")]

    def test_a_bug_is_503_without_a_traceback(self, client: FlaskClient, bot: Bot, monkeypatch: pytest.MonkeyPatch,
                                              logs: list[dict[str, Any]]) -> None:
        def broken(*_args: Any, **_kwargs: Any) -> None:
            raise KeyError("secret-looking internals")

        monkeypatch.setattr(inbound, "take", broken)
        response = post_signed(client, inbound_params())
        assert (503, "Internal Error") == (response.status_code, response.get_data(as_text=True))
        assert ["twilio_route.crashed"] == [event["event"] for event in logs if event["event"].startswith("twilio")]

    def test_a_retry_after_the_failure_is_accepted_once(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        """Nothing was stored by the refused attempt: Twilio's retry is new, and its own retry a duplicate."""
        params = inbound_params()
        with monkeypatch.context() as patch:
            patch.setattr(inbound, "take", lambda *_args, **_kwargs: (_ for _ in ()).throw(redis_lib.TimeoutError()))
            assert 503 == post_signed(client, params).status_code
        assert [200, 200] == [post_signed(client, params).status_code for _ in range(2)]
        assert [params["MessageSid"]] == [message["sid"] for message in inbox(redis)]
        assert json.loads(redis.lindex(keys.inbox(keys.conversation_id(bot.id, params["From"])), 0))["body"] == "hola"


class TestForm:
    """The fast path reads a body as werkzeug reads it."""

    @hypothesis_settings(max_examples=3000, deadline=None)
    @given(st.lists(st.sampled_from(["a", "B", "=", "&", "+", "%", "%2", "%2F", "%C3%A9", "%FF", "%zz", " ", "é",
                                     "\x00", ";", "?", "Body", "%26", "%3D", "%ED%A0%80"]), max_size=30).map("".join))
    def test_pairs_are_parse_qsl_s(self, query: str) -> None:
        assert parse_qsl(query, keep_blank_values=True, errors="werkzeug.url_quote") == pairs(query)

    def test_a_field_sent_twice_is_signed_with_both_values_and_stored_with_the_first(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis, route_calls: list[str]) -> None:
        params = MultiDict(inbound_params())
        params.add("Body", "second")
        response = client.post(INBOUND_PATH, data=params,
                               headers={"X-Twilio-Signature": sign(LOCAL + INBOUND_PATH, params)})
        assert (200, []) == (response.status_code, route_calls)
        assert ["hola"] == [message["body"] for message in inbox(redis)]
        # Signed over the first value only: the second is not Twilio's.
        forged = MultiDict(inbound_params())
        signature = sign(LOCAL + INBOUND_PATH, forged)
        forged.add("Body", "injected")
        assert 403 == client.post(INBOUND_PATH, data=forged, headers={"X-Twilio-Signature": signature}).status_code

    def test_a_count_past_64_bits_is_stored(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """orjson refuses it; the stored copy is written by json instead: acknowledged, never a 503."""
        response = post_signed(client, inbound_params(NumSegments="9" * 30, Body="%ED%A0%80"))
        assert 200 == response.status_code
        assert [(10 ** 30 - 1, "%ED%A0%80")] == [(message["num_segments"], message["body"]) for message in inbox(redis)]

    def test_what_json_writes_instead_is_as_compact_as_orjsons(self) -> None:
        assert b'{"n":1180591620717411303424,"a":[1,2]}' == jsonio.dumps({"n": 2 ** 70, "a": [1, 2]})
        assert orjson.dumps({"x": "1"}).decode() == jsonio.log_line({"x": Decimal("1")}, default=str)
        line = jsonio.log_line({"n": 2 ** 70, "o": Decimal("2")}, default=str)
        assert {"n": 2 ** 70, "o": "2"} == json.loads(line)

    @pytest.mark.parametrize("value", [10 ** 30, "lone \ud800 surrogate", {1: "a key that is no string"}, b"bytes"])
    def test_a_log_line_orjson_refuses_is_still_written(self, value: object) -> None:
        line = jsonio.log_line({"event": "x", "value": value}, default=repr)
        assert "x" == json.loads(line)["event"]
        assert json.loads(jsonio.dumps({"value": value if not isinstance(value, bytes) else "b"}))


def test_no_hook_of_the_app_or_the_route_is_skipped(app: Flask) -> None:
    """The fast path runs none of Flask's request hooks: were one added for the whole app or for the
    inbound route, texts answered without Flask would skip it. Add it to FastInbound too, then here."""
    scopes = (None, "inbound")
    hooks = [app.before_request_funcs, app.after_request_funcs, app.teardown_request_funcs,
             app.url_value_preprocessors]
    found = {scope: [hook.get(scope) for hook in hooks if hook.get(scope)] for scope in scopes}
    assert ({None: [], "inbound": []}, []) == (found, app.teardown_appcontext_funcs)
