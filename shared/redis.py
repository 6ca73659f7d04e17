"""Redis access: one client (and connection pool) per process, reached through get_redis()."""

from __future__ import annotations

import threading

import redis as redis_lib

from shared.settings import get_settings

_clients: dict[str, redis_lib.Redis] = {}
_lock = threading.Lock()


def connect(url: str) -> redis_lib.Redis:
    """A client for `url`; rediss:// accepts Heroku Redis's self-signed certificate."""
    options: dict[str, object] = {
        "decode_responses": True,
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "retry_on_timeout": True,
    }
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        options["ssl_cert_reqs"] = None
    return redis_lib.Redis.from_url(url, **options)


def get_redis(url: str | None = None) -> redis_lib.Redis:
    """The process-wide client for `url` (default: the settings' REDIS_URL)."""
    url = url or get_settings().redis_url
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = connect(url)
        return client


_scripts: dict[tuple[int, str], object] = {}


def script(client: redis_lib.Redis, source: str):  # type: ignore[no-untyped-def]
    """A registered Lua script for `client`: sent once, then called by its SHA (EVALSHA)."""
    cache_key = (id(client), source)
    registered = _scripts.get(cache_key)
    if registered is None:
        registered = _scripts[cache_key] = client.register_script(source)
    return registered


def with_constants(source: str, **constants: object) -> str:
    """A Lua script's text with each __NAME__ replaced by its constant: what never changes is
    written into the script once rather than sent with every call."""
    for name, value in constants.items():
        text = str(value)
        if "'" in text or "\\" in text:
            raise ValueError(f"{name} cannot go inside a Lua '...' string: {text!r}")
        source = source.replace(f"__{name}__", text)
    return source
