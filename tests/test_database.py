"""The database's schema is created and upgraded by `mammut-sms migrate`, and a process never runs on one that is behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import inspect

from shared import db
from shared.schema import metadata

KEY = Fernet.generate_key().decode()


def _run(code: str, database_url: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "ADMIN_API_TOKEN": "t",
                   "CREDENTIALS_KEY": KEY, "DATABASE_URL": database_url, "REDIS_URL": "redis://127.0.0.1:6379/15",
                   **(env or {})}
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("code", ["from webhook import create_app; create_app()", "import worker.app"])
def test_a_process_on_a_database_that_is_behind_stops_and_says_what_to_run(code: str, tmp_path: Path) -> None:
    """web and worker refuse to start on an unmigrated database, naming `mammut-sms migrate`."""
    result = _run(code, f"sqlite:///{tmp_path}/empty.sqlite3")

    assert 0 != result.returncode
    assert "mammut-sms migrate" in result.stderr


def test_migrate_creates_every_table_and_a_second_run_changes_nothing(tmp_path: Path, redis_url: str) -> None:
    """`mammut-sms migrate` (the Procfile's release phase) is idempotent."""
    url = f"sqlite:///{tmp_path}/fresh.sqlite3"
    command = "from cli.main import main; raise SystemExit(main(['migrate']))"
    # The release phase also looks in Redis for an earlier release's data (there is none here).
    first, second = _run(command, url, {"REDIS_URL": redis_url}), _run(command, url, {"REDIS_URL": redis_url})

    assert (0, 0) == (first.returncode, second.returncode), first.stderr + second.stderr
    assert "migrated from empty to" in first.stdout
    assert "already at" in second.stdout
    engine = db.make_engine(url)
    assert {table.name for table in metadata.sorted_tables} <= set(inspect(engine).get_table_names())
    db.check_schema(engine)  # raises if behind
    engine.dispose()


def test_migrations_match_the_declared_schema(database_url: str) -> None:
    """The migrated database has exactly the columns shared/schema.py declares (a forgotten migration fails here)."""
    engine = db.make_engine(database_url, size=1)
    inspector = inspect(engine)
    for table in metadata.sorted_tables:
        expected = {column.name for column in table.columns}
        assert expected == {column["name"] for column in inspector.get_columns(table.name)}, table.name
    engine.dispose()


def test_the_release_phase_migrates() -> None:
    """Heroku runs the Procfile's release line before every deploy: it is `mammut-sms migrate`."""
    from tests.support.processes import procfile

    assert "mammut-sms migrate" == procfile()["release"]
