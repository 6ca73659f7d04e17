"""Redis access: one client (and connection pool) per process, reached through get_redis().

Every pool is a BlockingConnectionPool sized to the process's threads: redis-py's default pool
raises "Too many connections" past 100 instead of waiting for a connection to come back.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import redis as redis_lib

from shared.settings import env_int, get_settings

# Connections beyond the process's threads: the lease renewer, the sweeper, the log's writer,
# retention, the bot cache's pub/sub and Dramatiq's consumers each hold one at times.
POOL_MARGIN = 16
# A thread waits this long for a free connection before its work fails (and is retried).
POOL_TIMEOUT_SECONDS = 10
# The Procfile's and gunicorn.conf.py's defaults, for a process started without the variables.
DEFAULT_WORKER_THREADS = 40
DEFAULT_WEB_THREADS = 4

_clients: dict[str, redis_lib.Redis] = {}
_lock = threading.Lock()
# Forks of this process's lineage so far, counted in each child as it starts.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class ForkAwarePool(redis_lib.BlockingConnectionPool):
    """redis-py's pool, except that it asks whether the process forked only after a fork.

    The pool checks before every use (`_checkpid`, two or three a command) by calling os.getpid(),
    a system call: 3% of the web process's time under load. A fork now bumps a counter in the
    child, and the pool compares counters; after one, redis-py's own check runs and resets the
    pool the child inherited, as before.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._forks_seen = _forks
        super().__init__(*args, **kwargs)

    def _checkpid(self) -> None:
        if self._forks_seen != _forks:
            super()._checkpid()
            self._forks_seen = _forks


def process_threads() -> int:
    """The threads a process may run at once. Heroku gives web and worker dynos the same
    variables, so this is the larger of the two; pools open connections only as they are needed,
    so a web process pays nothing for a worker-sized limit."""
    worker = env_int(os.environ, "WORKER_THREADS", DEFAULT_WORKER_THREADS, 1, 100_000)
    web = env_int(os.environ, "WEB_THREADS", DEFAULT_WEB_THREADS, 1, 100_000)
    return max(worker, web)


def pool_size() -> int:
    """Connections a process may open per pool: REDIS_POOL_SIZE, else its threads plus the
    background threads' margin. A smaller pool makes threads wait their turn, never fail."""
    return env_int(os.environ, "REDIS_POOL_SIZE", 0, 0, 100_000) or process_threads() + POOL_MARGIN


def blocking_pool(url: str, **options: Any) -> redis_lib.BlockingConnectionPool:
    """A pool for `url` that waits for a free connection when all are in use; rediss:// accepts
    Heroku Redis's self-signed certificate (from_url picks the SSL connection class for it)."""
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        options["ssl_cert_reqs"] = None
    return ForkAwarePool.from_url(
        url, max_connections=pool_size(), timeout=POOL_TIMEOUT_SECONDS, **options,
    )


def connect(url: str) -> redis_lib.Redis:
    """A client for `url` with its own pool, answering str."""
    pool = blocking_pool(
        url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
        health_check_interval=30, retry_on_timeout=True,
    )
    return redis_lib.Redis.from_pool(pool)


def get_redis(url: str | None = None) -> redis_lib.Redis:
    """The process-wide client for `url` (default: the settings' REDIS_URL)."""
    url = url or get_settings().redis_url
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = connect(url)
        return client


_scripts: dict[tuple[int, str], "Script"] = {}


def script(client: redis_lib.Redis, source: str) -> "Script":
    """A Lua script for `client`, called by its SHA (EVALSHA), sent whole the first time Redis lacks it."""
    cache_key = (id(client), source)
    registered = _scripts.get(cache_key)
    if registered is None:
        registered = _scripts[cache_key] = Script(client, source)
    return registered


class Script:
    """A Lua script run over one of the client's pooled connections, without redis-py's per-command
    layers (its retry wrapper, response callbacks and operation metrics): about a quarter of the
    client's CPU per script call (115 against 85 us in a loop on the 2-core machine of issue 28),
    and most of what this service sends Redis is scripts, the webhook's one step included.

    What those layers did that matters is kept: a connection that failed mid-command is closed (by
    the connection itself), never reused half-read; a script Redis has lost (a restart, SCRIPT
    FLUSH) is sent whole with EVAL, which also caches it again; and a connection that fails as the
    script is sent (Redis restarting) is replaced once, as redis-py's retry did, before the error
    reaches the caller. A timeout is not retried: the script may have run.
    """

    def __init__(self, client: redis_lib.Redis, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        pool = self.client.connection_pool
        # The pool hands out a connection only after checking that Redis has not closed it.
        connection = pool.get_connection()
        try:
            try:
                return self._run(connection, keys, args)
            except redis_lib.ConnectionError:
                # The connection closed itself on the error; sending again opens a new one.
                return self._run(connection, keys, args)
        finally:
            pool.release(connection)

    def _run(self, connection: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        connection.send_command("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return connection.read_response()
        except redis_lib.exceptions.NoScriptError:
            connection.send_command("EVAL", self.source, len(keys), *keys, *args)
            return connection.read_response()


def with_constants(source: str, **constants: object) -> str:
    """A Lua script's text with each __NAME__ replaced by its constant: what never changes is
    written into the script once rather than sent with every call."""
    for name, value in constants.items():
        text = str(value)
        if "'" in text or "\\" in text:
            raise ValueError(f"{name} cannot go inside a Lua '...' string: {text!r}")
        source = source.replace(f"__{name}__", text)
    return source
