"""Logs as rendered for production: one JSON event per line, numbers masked, secrets never written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from shared.logging import configure_logging
from shared.settings import DEVELOPMENT, PRODUCTION, Settings
from tests.conftest import CREDENTIALS_KEY

ADMIN = "admin-token-0123456789"


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _events(capsys: pytest.CaptureFixture[str], log_phone_numbers: str = "masked", **fields: Any) -> dict[str, Any]:
    """Log one event through the production configuration and return it as written."""
    configure_logging(Settings(admin_api_token=ADMIN, credentials_keys=(CREDENTIALS_KEY,), environment=PRODUCTION,
                               log_phone_numbers=log_phone_numbers))
    structlog.get_logger("test").info("hop", **fields)
    lines = capsys.readouterr().err.strip().splitlines()
    assert 1 == len(lines)
    return json.loads(lines[0])


def test_phone_fields_show_only_their_last_four_digits(capsys: pytest.CaptureFixture[str]) -> None:
    """The named phone fields are masked."""
    event = _events(capsys, from_="+15551234567", to="+15005550006", recipient="+447700900123")
    assert ("********4567", "********0006", "*********0123") == (event["from_"], event["to"], event["recipient"])


def test_phone_fields_are_masked_whatever_they_hold(capsys: pytest.CaptureFixture[str]) -> None:
    """A phone field is masked even when its value is no E.164 number: a short code, a malformed
    From a request carried, a WhatsApp address."""
    event = _events(capsys, from_="5551234567", number="whatsapp:+15551234567", sender="12345")
    assert ("******4567", "*****************4567", "*2345") == (event["from_"], event["number"], event["sender"])


def test_numbers_inside_other_fields_are_masked_too(capsys: pytest.CaptureFixture[str]) -> None:
    """A conversation id, a URL or an error message quoting a number does not leak it."""
    event = _events(capsys, conversation="3:+15551234567", error="21211: Invalid 'To' +15551234567",
                    url="/app:mammut-1/graph/user:3/messages?with=+15551234567", numbers=["+15551234567", 4])
    text = json.dumps(event)
    assert "+15551234567" not in text and "5551234567" not in text
    assert "3:********4567" == event["conversation"]
    assert ["********4567", 4] == event["numbers"]


@pytest.mark.parametrize("source", ["environment", "constructor"])
def test_numbers_are_masked_when_log_phone_numbers_is_not_set(capsys: pytest.CaptureFixture[str],
                                                              source: str) -> None:
    """Without LOG_PHONE_NUMBERS (read from the environment, or a Settings built in code), numbers are masked."""
    # Given logging configured from settings that never mention LOG_PHONE_NUMBERS
    settings = (Settings.from_env({"MAMMUT_SMS_ENV": DEVELOPMENT}) if source == "environment"
                else Settings(admin_api_token=ADMIN, credentials_keys=(CREDENTIALS_KEY,), environment=PRODUCTION))
    configure_logging(settings)
    # When an event carries one number in a phone field and another inside text
    structlog.get_logger("test").info("hop", from_="+15551234567", conversation="3:+15557654321")
    # Then each is written with its last four digits only
    written = capsys.readouterr().err
    assert "hop" in written and "********4567" in written and "3:********4321" in written
    assert "5551234567" not in written and "5557654321" not in written


def test_log_phone_numbers_full_keeps_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    """LOG_PHONE_NUMBERS=full is the operator's explicit choice to see them."""
    event = _events(capsys, log_phone_numbers="full", from_="+15551234567", conversation="3:+15551234567")
    assert ("+15551234567", "3:+15551234567") == (event["from_"], event["conversation"])


def test_secret_fields_are_redacted_whatever_their_name(capsys: pytest.CaptureFixture[str]) -> None:
    """Auth tokens, authorization headers and anything named like a secret never reach the log."""
    event = _events(capsys, auth_token="tok1", **{"twilio-auth-token": "tok2"}, authorization="Bearer tok3",
                    api_token="tok4", client_secret="tok5", message_sid="SM123")
    assert {"[redacted]"} == {event[name] for name in ("auth_token", "twilio-auth-token", "authorization",
                                                       "api_token", "client_secret")}
    assert "SM123" == event["message_sid"]


@pytest.mark.parametrize("name", ["token", "accessToken", "apiToken", "authToken", "private_key", "privateKey",
                                  "passwd", "pwd", "credentials", "bearer", "auth", "TOKEN1"])
def test_fields_whose_letters_spell_a_secret_are_redacted(capsys: pytest.CaptureFixture[str], name: str) -> None:
    """Judged on the name's letters, whatever its case, separators or digits."""
    assert "[redacted]" == _events(capsys, **{name: "s3cr3t-value"})[name]


def test_a_key_in_a_url_path_is_redacted_inside_text(capsys: pytest.CaptureFixture[str]) -> None:
    """A Slack-style webhook URL, or an HTTP error quoting only its path, keeps its ids but not its key."""
    event = _events(capsys, url="https://hooks.slack.com/services/T0123ABCD/B0456EFGH/Zx9SecretAbcdefGhijklMnop",
                    error="Max retries exceeded with url: /services/T0123ABCD/B0456EFGH/Zx9SecretAbcdefGhijklMnop (x)")
    assert "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/[redacted]" == event["url"]
    assert "Zx9Secret" not in event["error"] and "/services/T0123ABCD/B0456EFGH/[redacted] (x)" in event["error"]


def test_known_secrets_and_url_passwords_are_redacted_inside_text(capsys: pytest.CaptureFixture[str]) -> None:
    """The process's admin token and credentials key, and a Redis URL's password, are cut out of any text."""
    event = _events(capsys, error=f"refused 'Bearer {ADMIN}'", detail=f"key {CREDENTIALS_KEY} rejected",
                    redis="rediss://:p4ssw0rd@ec2-1-2-3-4.compute.amazonaws.com:6380")
    text = json.dumps(event)
    assert ADMIN not in text and CREDENTIALS_KEY not in text and "p4ssw0rd" not in text
    assert "rediss://:[redacted]@ec2-1-2-3-4.compute.amazonaws.com:6380" == event["redis"]


def test_a_urls_query_values_are_redacted_inside_text(capsys: pytest.CaptureFixture[str]) -> None:
    """An engine URL's ?token=... (or any URL's query values) never reaches the log."""
    event = _events(capsys, error="POST https://engine.example.com/hook?token=k3y&lang=es failed: timeout")
    assert "POST https://engine.example.com/hook?token=[redacted]&lang=[redacted] failed: timeout" == event["error"]


def test_a_traceback_is_scrubbed_like_any_other_field(capsys: pytest.CaptureFixture[str]) -> None:
    """An exception whose message holds a number and a token is logged without either."""
    configure_logging(Settings(admin_api_token=ADMIN, credentials_keys=(CREDENTIALS_KEY,), environment=PRODUCTION))
    try:
        raise RuntimeError(f"sending to +15551234567 with {ADMIN} failed")
    except RuntimeError:
        structlog.get_logger("test").exception("outbound.failed")
    event = json.loads(capsys.readouterr().err.strip())
    assert "RuntimeError: sending to ********4567 with [redacted] failed" in event["exception"]
