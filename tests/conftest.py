"""Fixtures: real Redis (fakeredis over TCP only where no server can be reached), the app, a bot."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import dramatiq
import pytest
import redis as redis_lib
import structlog
from cryptography.fernet import Fernet
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from shared import db, keys
from shared.bots import Bot, BotStore
from shared.conversations import LEGACY_MARKS
from shared.crypto import Vault
from shared.metrics import TALLY
from shared.poolnumbers import POOL_NUMBERS
from shared.redis import connect
from shared.schema import metadata
from shared.settings import DEVELOPMENT, Settings, get_settings
from shared.settings import database_url as normalized_database_url
from cli.dev import embedded_redis, in_background
from cli.twilio_standin import TwilioStandin
from tests.support.fake_engine import FakeEngine
from webhook import create_app

ADMIN_TOKEN = "test-admin-token"
CREDENTIALS_KEY = Fernet.generate_key().decode()
BOT_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
BOT_AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
BOT_NUMBER = "+15005550006"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def queued_kicks(redis: redis_lib.Redis) -> list[dramatiq.Message[object]]:
    """The dramatiq messages waiting on the conversations queue, read straight from Redis."""
    return [dramatiq.Message.decode(body.encode()) for body in redis.lrange(keys.WAKE_UPS, 0, -1)]


def _reachable(url: str) -> bool:
    try:
        return bool(connect(url).ping())
    except redis_lib.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis the tests (and the processes they start) share: TEST_REDIS_URL, the local server, or fakeredis."""
    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    if _reachable(url):
        yield url
        return
    with embedded_redis() as url:
        yield url


POSTGRES_TEST_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/mammut_sms_test"


def _postgres_database(url: str) -> str | None:
    """A PostgreSQL database, created if missing; None when no server answers."""
    server_url, name = url.rsplit("/", 1)
    try:
        server = db.make_engine(server_url + "/postgres", size=1)
        with server.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            exists = connection.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).first()
            if not exists:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        server.dispose()
    except Exception:  # noqa: BLE001 - no PostgreSQL here: the suite runs on SQLite
        return None
    return url


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The database the tests (and the processes they start) share, migrated to head:
    TEST_DATABASE_URL (`sqlite` alone: a temporary SQLite file), else the local PostgreSQL, else SQLite."""
    wanted = os.environ.get("TEST_DATABASE_URL", "")
    if wanted and wanted != "sqlite":
        url = normalized_database_url(wanted) or wanted
        if url.startswith("postgresql"):
            _postgres_database(url)
    else:
        url = (None if wanted else _postgres_database(POSTGRES_TEST_URL)) or f"sqlite:///{tmp_path_factory.mktemp('db')}/test.sqlite3"
    db.migrate(url)
    return url


def _empty(url: str) -> None:
    engine = db.make_engine(url, size=1)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            names = ", ".join(table.name for table in metadata.sorted_tables)
            connection.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY")
        else:
            for table in reversed(metadata.sorted_tables):
                connection.execute(table.delete())
            if connection.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").first():
                connection.exec_driver_sql("DELETE FROM sqlite_sequence")
    engine.dispose()


@pytest.fixture
def database(database_url: str) -> Iterator[str]:
    """The test database, emptied before and after the test."""
    _empty(database_url)
    yield database_url
    _empty(database_url)


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = connect(redis_url)
    client.flushdb()
    # What this process counted in memory for the previous test's service goes with its Redis.
    from worker.budget import DAILY_SENDS

    TALLY.forget()
    DAILY_SENDS.forget()
    POOL_NUMBERS.forget()
    LEGACY_MARKS.forget()
    yield client
    client.flushdb()


@pytest.fixture
def settings(redis_url: str, redis: redis_lib.Redis, database: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        database_url=database,
        admin_api_token=ADMIN_TOKEN,
        credentials_keys=(CREDENTIALS_KEY,),
        environment=DEVELOPMENT,
        log_level="DEBUG",
    )


@pytest.fixture
def app(settings: Settings) -> Flask:
    app = create_app(settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def store(settings: Settings, redis: redis_lib.Redis) -> BotStore:
    """The bot registry over the test database (the engine the app and the in-process worker share)."""
    return BotStore(db.get_engine(settings), redis, Vault([CREDENTIALS_KEY]))


@pytest.fixture
def unreachable() -> Iterator[db.Engine]:
    """A PostgreSQL engine nobody answers for (the connection is refused), as a database outage looks."""
    engine = db.make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere", size=1)
    yield engine
    engine.dispose()


@pytest.fixture
def bot(store: BotStore) -> Bot:
    """A registered bot with a known number and auth token."""
    return store.create({
        "name": "test-bot", "twilio-account-sid": BOT_ACCOUNT_SID,
        "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": BOT_NUMBER,
    })


# --- The worker side: a Twilio stand-in and a Dramatiq worker running in this process. ---


@pytest.fixture(scope="session")
def twilio() -> Iterator[TwilioStandin]:
    """A local Twilio REST stand-in, shared by the session; reset before each test that uses `worker`."""
    with TwilioStandin(accounts=None).start() as standin:
        yield standin


@pytest.fixture(scope="session")
def worker_env(redis_url: str, database_url: str, twilio: TwilioStandin) -> Iterator[dict[str, str]]:
    """The environment a worker process would have: the test Redis and database, the stand-in, development mode."""
    env = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "TWILIO_API_BASE_URL": twilio.url,
        "ADMIN_API_TOKEN": ADMIN_TOKEN,
        "CREDENTIALS_KEY": CREDENTIALS_KEY,
        "MAMMUT_SMS_ENV": DEVELOPMENT,
        "LOG_LEVEL": "DEBUG",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    get_settings.cache_clear()
    yield env
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def broker(worker_env: dict[str, str]) -> dramatiq.Broker:
    """The broker the worker's actors are declared on (importing worker.app declares them)."""
    import worker.app

    return worker.app.broker


@pytest.fixture
def worker(broker: dramatiq.Broker, redis: redis_lib.Redis, database: str,
           twilio: TwilioStandin) -> Iterator[dramatiq.Worker]:
    """A Dramatiq worker with several threads, consuming from the test Redis."""
    twilio.reset()
    running = dramatiq.Worker(broker, worker_timeout=50, worker_threads=4)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    """A Rasa-style conversation engine over real HTTP (answers `reply to <text>`)."""
    with FakeEngine() as fake:
        yield fake


@contextmanager
def serving(app: Flask) -> Iterator[str]:
    """`app` on a real local port, as the CLI reaches a running service; yields its base URL."""
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    with in_background(server, "test-app"):
        yield f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def live_server(app: Flask) -> Iterator[str]:
    """The app served over real HTTP on a local port."""
    with serving(app) as url:
        yield url


@pytest.fixture
def logs() -> Iterator[list[dict[str, object]]]:
    """Log events as structured dicts (development loggers are not cached, so every module's events show)."""
    with structlog.testing.capture_logs() as captured:
        yield captured
