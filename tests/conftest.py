"""Fixtures: real Redis (fakeredis over TCP only where no server can be reached), the app, a bot."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
import redis as redis_lib
from cryptography.fernet import Fernet
from flask import Flask
from flask.testing import FlaskClient

from shared.bots import Bot, BotStore
from shared.crypto import Vault
from shared.redis import connect
from shared.settings import DEVELOPMENT, Settings
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
    from fakeredis import TcpFakeServer

    port = free_port()
    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"redis://127.0.0.1:{port}/0"
    server.shutdown()


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = connect(redis_url)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def settings(redis_url: str, redis: redis_lib.Redis) -> Settings:
    return Settings(
        redis_url=redis_url,
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
def store(redis: redis_lib.Redis) -> BotStore:
    return BotStore(redis, Vault([CREDENTIALS_KEY]))


@pytest.fixture
def bot(store: BotStore) -> Bot:
    """A registered bot with a known number and auth token."""
    return store.create({
        "name": "test-bot", "twilio-account-sid": BOT_ACCOUNT_SID,
        "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": BOT_NUMBER,
    })
