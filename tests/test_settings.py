"""Settings are read once from the environment, and bad or missing values stop the process with their name."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.fernet import Fernet

from shared.settings import DEV_CREDENTIALS_KEY, Settings, SettingsError
from webhook.slowclient import DEFAULT_MAX_BUFFERED_BYTES

KEY = Fernet.generate_key().decode()
PG = "postgres://u:secret@db.example.com:5432/d"


def test_defaults_match_the_documentation() -> None:
    """With only the two secrets set, every other setting takes its documented default."""
    settings = Settings.from_env({"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": KEY, "DATABASE_URL": PG})

    assert ("redis://localhost:6379/0", "https://api.twilio.com", "mammut-1", None, None) == (
        settings.redis_url, settings.twilio_api_base_url, settings.app_id, settings.engine_url, settings.public_url)
    assert (50, 1) == (settings.twilio_max_concurrent_requests, settings.console_streams)


def test_the_web_process_holds_16_mib_of_unfinished_requests_by_default() -> None:
    """WEB_MAX_BUFFERED_BYTES is documented as 16 MiB when unset."""
    assert 16 * 1024 * 1024 == DEFAULT_MAX_BUFFERED_BYTES


@pytest.mark.parametrize("missing", ["ADMIN_API_TOKEN", "CREDENTIALS_KEY", "DATABASE_URL"])
def test_production_refuses_to_start_without_its_secrets(missing: str) -> None:
    """Outside development, a missing admin token or credentials key is an error naming it."""
    env = {"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": KEY, "DATABASE_URL": PG}
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
    ("DATABASE_URL", "mysql://u@h/d"),
    ("DATABASE_URL", "db.example.com"),
    ("LOG_RETENTION_DAYS", "0"),
    ("DATABASE_POOL_SIZE", "many"),
    ("TWILIO_MAX_CONCURRENT_REQUESTS", "0"),  # no send would ever get a slot
    ("TWILIO_MAX_CONCURRENT_REQUESTS", "10001"),
    ("CONSOLE_STREAMS", "-1"),
    ("CONSOLE_STREAMS", "1001"),
])
def test_a_malformed_variable_is_named(name: str, value: str) -> None:
    """Each malformed variable produces an error message that starts with its name."""
    env = {"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": KEY, "DATABASE_URL": PG, name: value}

    with pytest.raises(SettingsError, match=f"^{name}"):
        Settings.from_env(env)


def test_several_keys_rotate_and_hex_keys_are_accepted() -> None:
    """CREDENTIALS_KEY may list keys (first encrypts); 64 hex digits, as Heroku generates, is a key too."""
    settings = Settings.from_env({"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": f"{KEY}, {'ab' * 32}", "DATABASE_URL": PG})

    assert 2 == len(settings.credentials_keys)
    for key in settings.credentials_keys:
        Fernet(key)


def test_heroku_redis_tls_urls_are_accepted() -> None:
    """rediss:// (Heroku Redis, self-signed certificate) is a valid REDIS_URL."""
    settings = Settings.from_env({"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": KEY, "DATABASE_URL": PG, "REDIS_URL": "rediss://:p@host:6380"})

    assert "rediss://:p@host:6380" == settings.redis_url


def test_the_web_process_stops_at_start_naming_the_missing_variable() -> None:
    """Creating the app in production without ADMIN_API_TOKEN exits with that name, not a traceback deep inside."""
    code = "from webhook import create_app; create_app()"
    env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_KEY": KEY, "DATABASE_URL": PG}

    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)

    assert 0 != result.returncode
    assert "ADMIN_API_TOKEN is required" in result.stderr


@pytest.mark.parametrize("given, expected", [
    ("postgres://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),  # as Heroku Postgres sets it
    ("postgresql://u:p@h/d", "postgresql+psycopg://u:p@h/d"),
    ("sqlite:////var/data/sms.sqlite3", "sqlite:////var/data/sms.sqlite3"),
])
def test_database_urls_of_both_spellings_select_postgresql(given: str, expected: str) -> None:
    """Heroku's postgres:// and the standard postgresql:// both reach PostgreSQL through psycopg 3."""
    settings = Settings.from_env({"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": KEY, "DATABASE_URL": given})

    assert expected == settings.database_url


def test_development_without_database_url_uses_sqlite_in_the_working_directory() -> None:
    """`mammut-sms dev` and a first run need nothing installed: SQLite, in a file under the working directory."""
    settings = Settings.from_env({"MAMMUT_SMS_ENV": "development"})

    assert "sqlite:///mammut-sms.sqlite3" == settings.database_url


def test_a_malformed_database_url_is_named_without_its_password() -> None:
    """The error names DATABASE_URL and hides the password it carries."""
    with pytest.raises(SettingsError, match="^DATABASE_URL") as raised:
        Settings.from_env({"ADMIN_API_TOKEN": "t", "CREDENTIALS_KEY": KEY, "DATABASE_URL": "mysql://u:hunter2@h/d"})

    assert "hunter2" not in str(raised.value)
