"""Settings, read once from the environment into one typed object and validated at start."""

from __future__ import annotations

import base64
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from urllib.parse import urlsplit

from cryptography.fernet import Fernet

DEVELOPMENT = "development"
PRODUCTION = "production"

# A fixed, publicly known key: only ever used when MAMMUT_SMS_ENV=development, so a developer
# can run the service without generating secrets. Production refuses to start without its own.
DEV_CREDENTIALS_KEY = "ZGV2ZWxvcG1lbnQtb25seS1ub3QtYS1zZWNyZXQtISE="


# Without DATABASE_URL, development keeps its records in SQLite in the working directory.
DEV_DATABASE_URL = "sqlite:///mammut-sms.sqlite3"


class SettingsError(ValueError):
    """A variable of the environment is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://localhost:6379/0"
    admin_api_token: str | None = None
    credentials_keys: tuple[str, ...] = ()
    twilio_api_base_url: str = "https://api.twilio.com"
    engine_url: str | None = None
    public_url: str | None = None
    app_id: str = "mammut-1"
    port: int = 5000
    log_level: str = "INFO"
    log_phone_numbers: str = "masked"
    environment: str = PRODUCTION
    # None: SQLite in the working directory (development only; production requires DATABASE_URL).
    database_url: str | None = None
    # Connections each process may hold; None: sized from the process's threads (see shared.db).
    database_pool_size: int | None = None
    log_retention_days: int = 90
    # Private networks where bots' own engines may be (a bot's engine-url is otherwise kept to public addresses).
    engine_allowed_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    # How long a send whose outcome is unknown waits for Twilio's status callback before the
    # worker asks Twilio's message list (without PUBLIC_URL there are no callbacks: it asks sooner).
    send_reconcile_seconds: int = 60
    # REST requests one worker process keeps in flight per Twilio account: past it they queue for a
    # slot (Twilio answers 20429 past its own limit per account, 100 by default, across all processes).
    twilio_max_concurrent_requests: int = 50
    # Live streams of the console each web process keeps open (each holds one of its WEB_THREADS); past them, pages poll.
    console_streams: int = 1

    @property
    def development(self) -> bool:
        return self.environment == DEVELOPMENT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        environment = env_choice(env, "MAMMUT_SMS_ENV", (PRODUCTION, DEVELOPMENT), PRODUCTION)
        settings = cls(
            redis_url=_url(env, "REDIS_URL", ("redis", "rediss", "unix")) or cls.redis_url,
            admin_api_token=env.get("ADMIN_API_TOKEN") or None,
            credentials_keys=_fernet_keys(env),
            twilio_api_base_url=(_url(env, "TWILIO_API_BASE_URL", ("http", "https")) or cls.twilio_api_base_url).rstrip("/"),
            engine_url=_url(env, "ENGINE_URL", ("http", "https")),
            public_url=(_url(env, "PUBLIC_URL", ("http", "https")) or "").rstrip("/") or None,
            app_id=env.get("APP_ID") or cls.app_id,
            port=env_int(env, "PORT", cls.port, 1, 65535),
            log_level=env_choice(env, "LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", upper=True),
            log_phone_numbers=env_choice(env, "LOG_PHONE_NUMBERS", ("masked", "full"), "masked"),
            environment=environment,
            database_url=database_url(env.get("DATABASE_URL")),
            database_pool_size=env_int(env, "DATABASE_POOL_SIZE", 0, 0, 1000) or None,
            log_retention_days=env_int(env, "LOG_RETENTION_DAYS", cls.log_retention_days, 1, 36500),
            engine_allowed_networks=env_networks(env, "ENGINE_ALLOWED_NETWORKS"),
            send_reconcile_seconds=env_int(env, "SEND_RECONCILE_SECONDS", cls.send_reconcile_seconds, 1, 3600),
            twilio_max_concurrent_requests=env_int(env, "TWILIO_MAX_CONCURRENT_REQUESTS",
                                                   cls.twilio_max_concurrent_requests, 1, 10_000),
            console_streams=env_int(env, "CONSOLE_STREAMS", cls.console_streams, 0, 1000),
        )
        return settings.checked()

    def checked(self) -> Settings:
        """Outside development, refuse to run with an open registry or plain-text secrets."""
        if self.development:
            keys = self.credentials_keys or (DEV_CREDENTIALS_KEY,)
            return replace(self, credentials_keys=keys, database_url=self.database_url or DEV_DATABASE_URL)
        if not self.database_url:
            raise SettingsError(
                "DATABASE_URL is required (PostgreSQL, e.g. postgres://user:password@host:5432/db; Heroku Postgres "
                "sets it): a dyno's disk is not a database"
            )
        if not self.admin_api_token:
            raise SettingsError("ADMIN_API_TOKEN is required (the bearer token of the registry API)")
        if not self.credentials_keys:
            raise SettingsError(
                "CREDENTIALS_KEY is required (a Fernet key that encrypts Twilio auth tokens; "
                'make one with: python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())")'
            )
        return self

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes).checked()


def database_url(raw: str | None) -> str | None:
    """DATABASE_URL as SQLAlchemy takes it: Heroku's postgres:// and plain postgresql:// use psycopg 3."""
    url = (raw or "").strip()
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise SettingsError(f"DATABASE_URL={redacted_url(url)!r} is not a URL (postgres://... or sqlite:///...)")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    if scheme == "postgresql+psycopg" or scheme == "sqlite":
        return url
    raise SettingsError(f"DATABASE_URL={redacted_url(url)!r}: only PostgreSQL (postgres://) and SQLite (sqlite:///) are supported")


def redacted_url(url: str) -> str:
    """A URL fit for an error message: no password."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def env_choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str, upper: bool = False) -> str:
    raw = env.get(name) or default
    value = raw.upper() if upper else raw.lower()
    if value not in allowed:
        raise SettingsError(f"{name}={raw!r} is not one of {', '.join(allowed)}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={raw!r} is out of range ({low}-{high})")
    return value


def env_networks(env: Mapping[str, str], name: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """Comma-separated CIDR networks (a bare address is its own /32 or /128)."""
    networks = []
    for raw in (env.get(name) or "").split(","):
        if not raw.strip():
            continue
        try:
            networks.append(ip_network(raw.strip()))
        except ValueError as error:
            raise SettingsError(
                f"{name}: {raw.strip()!r} is not a network in CIDR notation, e.g. 10.0.0.0/8 or fd00::/8 ({error})"
            ) from None
    return tuple(networks)


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix"):
        raise SettingsError(f"{name}={raw!r} is not a {'/'.join(schemes)} URL")
    return raw


def _fernet_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("CREDENTIALS_KEY") or ""
    keys = tuple(_as_fernet(key.strip()) for key in raw.split(",") if key.strip())
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except ValueError:
            raise SettingsError(
                f"CREDENTIALS_KEY: key {position} is neither a Fernet key (32 url-safe base64-encoded bytes) "
                "nor 64 hex digits"
            ) from None
    return keys


def _as_fernet(key: str) -> str:
    """Heroku's app.json "secret" generator makes 64 hex digits: the same 32 bytes, spelled differently."""
    if len(key) == 64 and all(c in string.hexdigits for c in key):
        return base64.urlsafe_b64encode(bytes.fromhex(key)).decode()
    return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
