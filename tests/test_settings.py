"""Settings are read once from the environment, and bad or missing values stop the process with their name."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.fernet import Fernet

from shared.settings import DEV_CREDENTIALS_KEY, Settings, SettingsError

KEY = Fernet.generate_key().decode()


def test_defaults_match_the_documentation() -> None:
    """With only the two secrets set, every other setting takes its documented default."""
    settings = Settings.from_env({"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": KEY})

    assert ("redis://localhost:6379/0", "https://api.twilio.com", "mammut-1", None, None) == (
        settings.redis_url, settings.twilio_api_base_url, settings.app_id, settings.engine_url, settings.public_url)


@pytest.mark.parametrize("missing", ["ADMIN_API_TOKEN", "CREDENTIALS_KEY"])
def test_production_refuses_to_start_without_its_secrets(missing: str) -> None:
    """Outside development, a missing admin token or credentials key is an error naming it."""
    env = {"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": KEY}
    del env[missing]

    with pytest.raises(SettingsError, match=missing):
        Settings.from_env(env)


def test_development_runs_without_secrets() -> None:
    """mammut-sms dev and the tests run with MAMMUT_SMS_ENV=development and no secrets."""
    settings = Settings.from_env({"MAMMUT_SMS_ENV": "development"})

    assert (DEV_CREDENTIALS_KEY,) == settings.credentials_keys


@pytest.mark.parametrize("name, value", [
    ("REDIS_URL", "localhost:6379"),
    ("TWILIO_API_BASE_URL", "api.twilio.com"),
    ("PUBLIC_URL", "ftp://example.com"),
    ("ENGINE_URL", "not a url"),
    ("PORT", "eighty"),
    ("PORT", "70000"),
    ("LOG_LEVEL", "LOUD"),
    ("CREDENTIALS_KEY", "not-a-fernet-key"),
    ("MAMMUT_SMS_ENV", "staging"),
])
def test_a_malformed_variable_is_named(name: str, value: str) -> None:
    """Each malformed variable produces an error message that starts with its name."""
    env = {"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": KEY, name: value}

    with pytest.raises(SettingsError, match=f"^{name}"):
        Settings.from_env(env)


def test_several_keys_rotate_and_hex_keys_are_accepted() -> None:
    """CREDENTIALS_KEY may list keys (first encrypts); 64 hex digits, as Heroku generates, is a key too."""
    settings = Settings.from_env({"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": f"{KEY}, {'ab' * 32}"})

    assert 2 == len(settings.credentials_keys)
    for key in settings.credentials_keys:
        Fernet(key)


def test_heroku_redis_tls_urls_are_accepted() -> None:
    """rediss:// (Heroku Redis, self-signed certificate) is a valid REDIS_URL."""
    settings = Settings.from_env({"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": KEY, "REDIS_URL": "rediss://:p@host:6380"})

    assert "rediss://:p@host:6380" == settings.redis_url


def test_the_web_process_stops_at_start_naming_the_missing_variable() -> None:
    """Creating the app in production without ADMIN_API_TOKEN exits with that name, not a traceback deep inside."""
    code = "from webhook import create_app; create_app()"
    env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_KEY": KEY}

    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)

    assert 0 != result.returncode
    assert "ADMIN_API_TOKEN is required" in result.stderr
