"""The SQL database (the system of record): one engine per process, reached through get_engine().

PostgreSQL in production, SQLite when DATABASE_URL is unset in development. Repositories (bots,
opt-outs, the message log, dead letters) are plain functions over a Connection; nothing on the
webhook's inbound hot path queries the database.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Executable, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.sql.dml import Insert

from shared.logging import get_logger
from shared.redis import process_threads
from shared.settings import Settings

log = get_logger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# A thread waits this long for a free connection before its work fails (and is retried).
POOL_TIMEOUT_SECONDS = 10
CONNECT_TIMEOUT_SECONDS = 3
# Once the database could not be reached, a new connection is tried once per this long; every
# other caller is refused at once (DatabaseUnavailable) rather than waiting out a timeout.
PROBE_SECONDS = 2.0
STATEMENT_TIMEOUT_MS = 15_000
# Connections a process keeps without DATABASE_POOL_SIZE: its threads, up to this many (a busy
# thread holds one for milliseconds; Heroku's smaller Postgres plans allow 20-120 in all).
DEFAULT_POOL_CAP = 10

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


class SchemaBehind(RuntimeError):
    """The database's schema is not the one this release needs; the message says what to run."""


def pool_size(settings: Settings) -> int:
    if settings.database_pool_size:
        return settings.database_pool_size
    return max(2, min(process_threads(), DEFAULT_POOL_CAP))


class DatabaseUnavailable(SQLAlchemyError):
    """The database could not be reached a moment ago: refused at once, without trying again."""


class Reachability:
    """Whether this process reached its database last time it tried, and when it may try again."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self) -> None:
        with self._lock:
            if self.down_since is None:
                self.down_since = time.time()
                log.error("database.unreachable")
            self._next_try = time.monotonic() + PROBE_SECONDS

    def reached(self) -> None:
        if self.down_since is not None:
            log.info("database.reachable_again", down_for=round(time.time() - self.down_since, 1))
            self.down_since = None

    def may_try(self) -> bool:
        """While down, one caller per PROBE_SECONDS may try to connect (and so find it back)."""
        if self.down_since is None:
            return True
        with self._lock:
            if time.monotonic() < self._next_try:
                return False
            self._next_try = time.monotonic() + PROBE_SECONDS
            return True


_reachability: weakref.WeakKeyDictionary[Engine, Reachability] = weakref.WeakKeyDictionary()


def reachability(engine: Engine) -> Reachability:
    """The engine's reachability (SQLite's, in a file, is always up)."""
    return _reachability.setdefault(engine, Reachability())


def make_engine(url: str, size: int = 5) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    engine = create_engine(
        url, pool_size=size, max_overflow=0, pool_timeout=POOL_TIMEOUT_SECONDS, pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS,
                      "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"},
    )
    _watch_reachability(engine, reachability(engine))
    return engine


def _watch_reachability(engine: Engine, state: Reachability) -> None:
    """Refuse new connections at once while the database is down (but for a probe now and then), so
    an API request answers 503 at once and no thread holds a connection slot for the timeout."""

    @event.listens_for(engine, "do_connect")
    def _gate(*_: Any) -> None:
        if not state.may_try():
            raise DatabaseUnavailable("the database was unreachable a moment ago; not trying again yet")

    @event.listens_for(engine, "handle_error")
    def _failed(context: ExceptionContext) -> None:
        # A dropped connection, or none made: not a statement's own error (a constraint, a timeout).
        if context.is_disconnect or context.connection is None:
            state.failed()

    @event.listens_for(engine, "engine_connect")
    def _reached(_connection: Connection) -> None:
        state.reached()


def database_up(engine: Engine) -> bool:
    """Whether the database answers now (at once False while this process finds it down)."""
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
        return True
    except SQLAlchemyError:
        return False


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Transactions are begun by hand below (pysqlite's own begin comes too late for locks).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # web and worker read while the other writes
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that reads, then writes,
        # fails with "database is locked" instead of waiting when another process wrote meanwhile.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def get_engine(settings: Settings) -> Engine:
    """The process-wide engine for the settings' database."""
    url = settings.database_url
    if not url:
        raise SchemaBehind("no database configured: set DATABASE_URL")
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url, pool_size(settings))
        return engine


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    with engine.begin() as connection:
        yield connection


def insert(connection: Connection, table: Table) -> Insert:
    """An INSERT with the dialect's ON CONFLICT clauses (PostgreSQL and SQLite spell them alike)."""
    return _dialect_insert(connection.dialect.name, table)


def _dialect_insert(dialect: str, table: Table) -> Insert:
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


_built: dict[tuple[str, str], Executable] = {}


def built(connection: Connection, name: str, build: Callable[[Callable[[Table], Insert]], Executable]) -> Executable:
    """The statement `name`, built once per dialect by `build` (given the dialect's insert): on the
    workers' hot path, constructing an upsert costs more than sending it. Run it with parameters."""
    key = (connection.dialect.name, name)
    statement = _built.get(key)
    if statement is None:
        statement = _built[key] = build(lambda table: _dialect_insert(key[0], table))
    return statement


def insert_ignoring_duplicates(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows whose primary key is not there yet; rows already there are left as they are."""
    if rows:
        connection.execute(insert(connection, table).on_conflict_do_nothing(), list(rows))


# --- migrations ---------------------------------------------------------------------------


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config("")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def migrate(url: str) -> tuple[str | None, str]:
    """Bring the database's schema to this release's; returns (revision before, revision now)."""
    from alembic import command

    engine = make_engine(url, size=1)
    try:
        before = current_revision(engine)
    finally:
        engine.dispose()
    command.upgrade(_alembic_config(url), "head")
    return before, head_revision()


def check_schema(engine: Engine) -> None:
    """Stop a process whose database is not at this release's schema, saying what to run. A process
    started while the database is unreachable starts anyway: it answers texts from Redis's copies."""
    try:
        current, head = current_revision(engine), head_revision()
    except (OperationalError, DatabaseUnavailable) as error:
        log.warning("database.schema_unchecked", reason="the database is unreachable", error=error.__class__.__name__)
        return
    if current != head:
        where = "empty" if current is None else f"at revision {current}"
        raise SchemaBehind(
            f"the database schema is {where}, this release needs {head}: run `mammut-sms migrate` "
            "(on Heroku the Procfile's release phase runs it on every deploy)"
        )
