"""X-Twilio-Signature: Twilio's published vector, and the URL the webhook checks it against.

Every signature in these tests is made with twilio's own RequestValidator, never with the code under test.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import pytest
from flask import Flask
from flask.testing import FlaskClient
from twilio.request_validator import RequestValidator
from werkzeug.datastructures import MultiDict
from werkzeug.test import TestResponse

from shared.bots import Bot
from shared.settings import Settings
from tests.conftest import BOT_ACCOUNT_SID, BOT_AUTH_TOKEN, BOT_NUMBER
from webhook import create_app
from webhook.twilio_auth import EMPTY_TWIML, is_signed, signed_url

# Twilio's worked example (twilio.com/docs/usage/webhooks/webhooks-security). Note that
# shared/reference/twilio.md pairs this signature with Caller/From +12349013030: those numbers belong
# to the older mycompany.com version of the example (checked below too), not to this one.
VECTOR_TOKEN = "12345"
VECTOR_URL = "https://example.com/myapp.php?foo=1&bar=2"
VECTOR_PARAMS = {
    "CallSid": "CA1234567890ABCDE", "Caller": "+14158675310", "Digits": "1234",
    "From": "+14158675310", "To": "+18005551212",
}
VECTOR_SIGNATURE = "L/OH5YylLD5NRKLltdqwSvS0BnU="
OLDER_VECTOR_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
OLDER_VECTOR_PARAMS = {**VECTOR_PARAMS, "Caller": "+12349013030", "From": "+12349013030"}
OLDER_VECTOR_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="

# The Flask test client calls http://localhost/ unless told otherwise.
LOCAL = "http://localhost"
INBOUND_PATH = "/channels/sms/"


def sign(url: str, params: Mapping[str, str] | MultiDict[str, str], token: str = BOT_AUTH_TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


def inbound_params(**overrides: str) -> dict[str, str]:
    """The form Twilio posts for a plain inbound SMS to the test bot, with a fresh MessageSid."""
    sid = "SM" + uuid.uuid4().hex
    params = {
        "MessageSid": sid, "SmsMessageSid": sid, "SmsSid": sid, "AccountSid": BOT_ACCOUNT_SID,
        "From": "+15551230001", "To": BOT_NUMBER, "Body": "hola", "NumMedia": "0", "NumSegments": "1",
        "SmsStatus": "received", "ApiVersion": "2010-04-01",
    }
    params.update(overrides)
    return params


def post_signed(client: FlaskClient, params: Mapping[str, str] | MultiDict[str, str], path: str = INBOUND_PATH,
                signed_as: str | None = None, headers: Mapping[str, str] | None = None,
                token: str = BOT_AUTH_TOKEN) -> TestResponse:
    """POST `params` to `path` the way Twilio would, signed over `signed_as` (default: the URL called)."""
    url = signed_as or LOCAL + path
    all_headers = {"X-Twilio-Signature": sign(url, params, token), **(headers or {})}
    return client.post(path, data=params, headers=all_headers)


class TestTwilioVector:
    """The published test vector passes, and any change to it fails."""

    def test_published_vector_is_valid_through_twilio_validator(self) -> None:
        """RequestValidator itself accepts Twilio's example: the vector is transcribed correctly."""
        assert RequestValidator(VECTOR_TOKEN).validate(VECTOR_URL, VECTOR_PARAMS, VECTOR_SIGNATURE)

    def test_published_vector_is_valid_through_our_helper(self) -> None:
        """The webhook's check accepts Twilio's example signature."""
        assert is_signed(VECTOR_TOKEN, VECTOR_URL, VECTOR_PARAMS, VECTOR_SIGNATURE)

    def test_older_published_vector_is_valid_through_our_helper(self) -> None:
        """The earlier edition of the example (mycompany.com, +12349013030) passes too."""
        assert RequestValidator(VECTOR_TOKEN).validate(OLDER_VECTOR_URL, OLDER_VECTOR_PARAMS, OLDER_VECTOR_SIGNATURE)
        assert is_signed(VECTOR_TOKEN, OLDER_VECTOR_URL, OLDER_VECTOR_PARAMS, OLDER_VECTOR_SIGNATURE)

    @pytest.mark.parametrize("change", [
        {"url": VECTOR_URL.replace("https", "http")},
        {"url": VECTOR_URL.replace("foo=1", "foo=2")},
        {"params": {**VECTOR_PARAMS, "Digits": "1235"}},
        {"params": {**VECTOR_PARAMS, "Extra": "1"}},
        {"token": "54321"},
    ], ids=["scheme", "query", "param", "added-param", "token"])
    def test_any_change_to_the_vector_fails(self, change: dict[str, object]) -> None:
        """Scheme, query, a parameter's value, an extra parameter or the token each break the signature."""
        url = str(change.get("url", VECTOR_URL))
        params = change.get("params", VECTOR_PARAMS)
        token = str(change.get("token", VECTOR_TOKEN))
        assert not is_signed(token, url, params, VECTOR_SIGNATURE)  # type: ignore[arg-type]

    def test_url_signed_with_default_port_is_accepted_without_it(self) -> None:
        """Twilio sometimes signs https://host:443/...; the port variants are both accepted."""
        with_port = "https://example.com:443/myapp.php?foo=1&bar=2"
        assert is_signed(VECTOR_TOKEN, VECTOR_URL, VECTOR_PARAMS, sign(with_port, VECTOR_PARAMS, VECTOR_TOKEN))

    def test_sha256_signature_is_checked_when_twilio_says_so(self) -> None:
        """With X-Twilio-Webhooks-Signature-Settings naming HMAC_SHA256, that algorithm is used."""
        signature = RequestValidator(VECTOR_TOKEN).compute_signature(VECTOR_URL, VECTOR_PARAMS, "HMAC_SHA256")
        settings = "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"
        assert is_signed(VECTOR_TOKEN, VECTOR_URL, VECTOR_PARAMS, signature, settings)
        assert not is_signed(VECTOR_TOKEN, VECTOR_URL, VECTOR_PARAMS, signature)


class TestSignedUrl:
    """The URL checked is the one Twilio called."""

    def test_public_url_replaces_scheme_and_host_and_keeps_the_query(self, app: Flask) -> None:
        """With PUBLIC_URL set, the URL is PUBLIC_URL + path + query string."""
        with app.test_request_context("/channels/sms/?rc=2&x=%20y", method="POST", base_url="http://10.0.0.7:5000"):
            from flask import request

            assert "https://api.mammut.io/channels/sms/?rc=2&x=%20y" == signed_url(request, "https://api.mammut.io")

    def test_without_public_url_the_request_url_is_used(self, app: Flask) -> None:
        """Without PUBLIC_URL, the URL is the request's own (ProxyFix has rebuilt it)."""
        with app.test_request_context("/channels/sms", method="POST", base_url="https://api.mammut.io"):
            from flask import request

            assert "https://api.mammut.io/channels/sms" == signed_url(request, None)


class TestWebhookSignature:
    """The webhook accepts exactly the requests Twilio signed for the bot's number."""

    def test_signed_request_is_acknowledged(self, client: FlaskClient, bot: Bot) -> None:
        """A request signed over the URL called gets the empty TwiML."""
        response = post_signed(client, inbound_params())
        assert (200, EMPTY_TWIML) == (response.status_code, response.get_data(as_text=True))

    def test_proxy_case_https_signed_while_app_sees_http(self, client: FlaskClient, bot: Bot) -> None:
        """Behind Heroku's router the app sees http://internal; X-Forwarded-Proto/Host restore the signed URL."""
        # Given Twilio signed the public https URL
        params = inbound_params()
        public = "https://api.mammut.io/channels/sms/"
        forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.mammut.io"}
        # When the router forwards it over http with the X-Forwarded headers
        accepted = post_signed(client, params, signed_as=public, headers=forwarded)
        # Then it is accepted; and without those headers the same signature does not match
        refused = post_signed(client, inbound_params(), signed_as=public)
        assert (200, 403) == (accepted.status_code, refused.status_code)

    def test_public_url_setting_is_what_is_checked(self, settings: Settings, bot: Bot) -> None:
        """With PUBLIC_URL set, a request signed over PUBLIC_URL + path + query is accepted whatever Host says."""
        client = create_app(settings.with_overrides(public_url="https://api.mammut.io")).test_client()
        path = "/channels/sms/?source=twilio"
        accepted = post_signed(client, inbound_params(), path=path, signed_as="https://api.mammut.io" + path)
        refused = post_signed(client, inbound_params(), path=path)  # signed over http://localhost/...
        assert (200, 403) == (accepted.status_code, refused.status_code)

    def test_unknown_parameters_are_signed_over_and_accepted(self, client: FlaskClient, bot: Bot) -> None:
        """Parameters Twilio adds without notice count in the signature, and do not stop the message."""
        params = inbound_params(SomeNewTwilioField="42", AddOns='{"status":"successful"}')
        assert 200 == post_signed(client, params).status_code

    def test_repeated_parameter_values_are_all_signed(self, client: FlaskClient, bot: Bot) -> None:
        """A parameter sent twice is signed over both values, as Twilio does."""
        params = MultiDict(inbound_params())
        params.add("Tag", "b")
        params.add("Tag", "a")
        assert 200 == post_signed(client, params).status_code

    def test_tampered_parameter_is_refused(self, client: FlaskClient, bot: Bot) -> None:
        """Changing one value after signing gives 403."""
        params = inbound_params(Body="hola")
        headers = {"X-Twilio-Signature": sign(LOCAL + INBOUND_PATH, params)}
        response = client.post(INBOUND_PATH, data={**params, "Body": "adios"}, headers=headers)
        assert 403 == response.status_code

    def test_parameter_added_after_signing_is_refused(self, client: FlaskClient, bot: Bot) -> None:
        """An extra parameter slipped in after signing gives 403: unknown parameters count too."""
        params = inbound_params()
        headers = {"X-Twilio-Signature": sign(LOCAL + INBOUND_PATH, params)}
        assert 403 == client.post(INBOUND_PATH, data={**params, "Injected": "1"}, headers=headers).status_code

    def test_missing_signature_is_refused(self, client: FlaskClient, bot: Bot) -> None:
        """No X-Twilio-Signature header: 403."""
        assert 403 == client.post(INBOUND_PATH, data=inbound_params()).status_code

    def test_signature_with_another_token_is_refused(self, client: FlaskClient, bot: Bot) -> None:
        """Signed with some other account's token: 403."""
        assert 403 == post_signed(client, inbound_params(), token="f" * 32).status_code

    def test_wrong_account_sid_is_refused_even_when_signed(self, client: FlaskClient, bot: Bot) -> None:
        """AccountSid must be the bot's account, signature or not."""
        params = inbound_params(AccountSid="AC" + "f" * 32)
        assert 403 == post_signed(client, params).status_code
