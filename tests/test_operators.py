"""`mammut-sms operators`: console accounts with argon2 passwords, never taken from a flag; a new
password or a removed account ends its sessions."""

from __future__ import annotations

import pytest
import redis as redis_lib
from sqlalchemy import select

from cli.main import main
from shared import operators, sessions
from shared.bots import Bot
from shared.db import get_engine
from shared.schema import operators as operators_table
from shared.settings import Settings

PASSWORD = "correct horse battery"


@pytest.fixture
def cli_env(worker_env: dict[str, str], database: str, redis: redis_lib.Redis,
            monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The service's environment, no terminal, and MAMMUT_SMS_PASSWORD set."""
    monkeypatch.setenv("MAMMUT_SMS_PASSWORD", PASSWORD)
    return Settings.from_env()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["operators", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_added_operator_signs_in_with_its_password_kept_only_as_an_argon2_hash(
        cli_env: Settings, bot: Bot, capsys: pytest.CaptureFixture[str]) -> None:
    """`add` reads the password from MAMMUT_SMS_PASSWORD; the database holds an argon2id hash of it."""
    code, out, _ = run(capsys, "add", "Ana@Example.com", "--role", "operator", "--bots", str(bot.id))
    listed = run(capsys, "list")[1]
    engine = get_engine(cli_env)
    with engine.connect() as connection:
        [stored] = connection.execute(select(operators_table.c.password_hash)).scalars()
        right = operators.authenticate(connection, "ana@example.com", PASSWORD)
        wrong = operators.authenticate(connection, "ana@example.com", PASSWORD + "!")
        nobody = operators.authenticate(connection, "bea@example.com", PASSWORD)
    assert 0 == code
    assert f"added ana@example.com (operator, bots {bot.id})" in out
    assert f"ana@example.com  operator  bots {bot.id}" in listed
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert right is not None and (bot.id,) == right.bots
    assert (None, None) == (wrong, nobody)


def test_a_password_is_never_a_flag_and_without_a_terminal_comes_only_from_the_environment(
        cli_env: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--password` is refused by argparse; without MAMMUT_SMS_PASSWORD and no terminal, nothing is added."""
    with pytest.raises(SystemExit) as flagged:
        main(["operators", "add", "ana@example.com", "--role", "admin", "--password", PASSWORD])
    capsys.readouterr()
    monkeypatch.delenv("MAMMUT_SMS_PASSWORD")
    code, _, err = run(capsys, "add", "ana@example.com", "--role", "admin")
    assert 2 == flagged.value.code
    assert (1, "no terminal to ask on: set MAMMUT_SMS_PASSWORD") == (code, err.strip().split(": ", 1)[1])
    assert "no operators" in run(capsys, "list")[1]


@pytest.mark.parametrize("argv, complaint", [
    (["add", "ana@example.com", "--role", "operator", "--bots", "99"], "no bot with id 99"),
    (["add", "not-an-email", "--role", "operator"], "is not an email address"),
    (["remove", "nobody@example.com"], "no account nobody@example.com"),
])
def test_an_unknown_bot_a_bad_email_or_an_unknown_account_is_refused(
        argv: list[str], complaint: str, cli_env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 1 with the reason, and nothing stored."""
    code, _, err = run(capsys, *argv)
    assert 1 == code
    assert complaint in err


def test_a_short_password_is_refused(cli_env: Settings, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """At least 12 characters."""
    monkeypatch.setenv("MAMMUT_SMS_PASSWORD", "short")
    code, _, err = run(capsys, "add", "ana@example.com", "--role", "admin")
    assert 1 == code and "at least 12 characters" in err


@pytest.mark.parametrize("action", ["reset-password", "remove"])
def test_a_new_password_or_a_removed_account_ends_its_sessions(
        action: str, cli_env: Settings, redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every session of the account is gone from Redis; other accounts' sessions stay."""
    run(capsys, "add", "ana@example.com", "--role", "admin")
    run(capsys, "add", "bea@example.com", "--role", "admin")
    with get_engine(cli_env).connect() as connection:
        ana, bea = (operators.by_email(connection, email) for email in ("ana@example.com", "bea@example.com"))
    assert ana is not None and bea is not None
    tokens = [sessions.start(redis, ana.id), sessions.start(redis, ana.id)]
    other = sessions.start(redis, bea.id)
    monkeypatch.setenv("MAMMUT_SMS_PASSWORD", "a brand new password")

    code, out, _ = run(capsys, action, "ana@example.com")

    assert 0 == code and "2 session(s) ended" in out
    assert [None, None] == [sessions.find(redis, token) for token in tokens]
    assert sessions.find(redis, other) is not None
    with get_engine(cli_env).connect() as connection:
        signed_in = operators.authenticate(connection, "ana@example.com", "a brand new password")
    assert (signed_in is not None) == (action == "reset-password")
