"""The benchmarks' database: BENCH_DATABASE_URL, else the local PostgreSQL's mammut_sms_bench (as
production runs), else a SQLite file; migrated, and emptied before each use."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from shared import db
from shared.schema import metadata
from shared.settings import database_url

LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
BENCH_DATABASE = "mammut_sms_bench"


def bench_database_url() -> str:
    """The database the benchmark's processes share, migrated to this release's schema."""
    url = database_url(os.environ.get("BENCH_DATABASE_URL")) or _local_postgres() \
        or f"sqlite:///{tempfile.gettempdir()}/mammut-sms-bench.sqlite3"
    db.migrate(url)
    return url


def empty(url: str) -> None:
    """Every table emptied, so each run starts from the same state."""
    engine = db.make_engine(url, size=1)
    with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(table.delete())
    engine.dispose()


def service_env(redis_url: str, database_url: str, twilio_url: str, **extra: str) -> dict[str, str]:
    """The environment the benchmarks give the Procfile's processes: their Redis and database, the
    Twilio stand-in, quiet logs, and loopback allowed for the bots' local engines."""
    return {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "TWILIO_API_BASE_URL": twilio_url,
            "CREDENTIALS_KEY": os.environ["CREDENTIALS_KEY"], "ADMIN_API_TOKEN": "bench", "LOG_LEVEL": "WARNING",
            "ENGINE_ALLOWED_NETWORKS": "127.0.0.0/8", **extra}


def describe(url: str) -> str:
    """The database for a benchmark's printout, without credentials."""
    return url.split("@")[-1] if url.startswith("postgresql") else url


def _local_postgres() -> str | None:
    try:
        server = db.make_engine(f"{LOCAL_POSTGRES}/postgres", size=1)
        with server.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            if not connection.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DATABASE,)).first():
                connection.exec_driver_sql(f"CREATE DATABASE {BENCH_DATABASE}")
        server.dispose()
    except Exception:  # noqa: BLE001 - no PostgreSQL here: SQLite
        return None
    return f"{LOCAL_POSTGRES}/{BENCH_DATABASE}"


def settled(redis: Any) -> None:
    """A flushed Redis as a deployment's is 60 hours after an upgrade: the earlier releases' dedupe
    marks have expired, and the webhook no longer looks for them (shared.conversations.LegacyMarks).
    A fresh Redis otherwise reads as just upgraded, which is the safe side for a real one."""
    from shared import keys

    redis.set(keys.LEGACY_MARKS_UNTIL, 1)
