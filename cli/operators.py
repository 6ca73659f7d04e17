"""`mammut-sms operators add|list|remove|reset-password`: the people who sign in to the console.

Runs with the service's environment (DATABASE_URL, REDIS_URL), e.g. `heroku run mammut-sms operators list`.
A password comes from a prompt, or from MAMMUT_SMS_PASSWORD when there is no terminal; never from a
flag, which would leave it in the shell's history and the process list.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from sqlalchemy import select

from shared import access, operators, sessions
from shared.db import get_engine, transaction
from shared.redis import connect
from shared.schema import bots
from shared.settings import Settings

PASSWORD_VARIABLE = "MAMMUT_SMS_PASSWORD"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "operators", help="manage the people who sign in to the console",
        description="Accounts of the operator console (/console/). An admin manages bots and keys; an operator "
                    "sees and answers only the conversations of the bots named (every bot when none are). "
                    f"Passwords are asked at a prompt, or read from ${PASSWORD_VARIABLE} without a terminal. "
                    "Run with the service's environment (DATABASE_URL and REDIS_URL).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="a new account", description="Add an account; asks for its password.")
    add.add_argument("email")
    add.add_argument("--role", required=True, choices=access.ROLES)
    add.add_argument("--bots", type=_bot_ids, default=[], metavar="1,2",
                     help="the bots it may reach (default: every bot)")
    actions.add_parser("list", help="every account", description="List the accounts.")
    remove = actions.add_parser("remove", help="remove an account (its sessions end at once)",
                                description="Remove an account and end its sessions.")
    remove.add_argument("email")
    reset = actions.add_parser("reset-password", help="a new password (its sessions end at once)",
                               description="Set a new password and end the account's sessions.")
    reset.add_argument("email")
    for sub in (add, actions.choices["list"], remove, reset):
        sub.set_defaults(run=run)


def _bot_ids(raw: str) -> list[int]:
    try:
        ids = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r}: bot ids separated by commas, such as 1,2") from None
    if any(bot_id < 1 for bot_id in ids):
        raise argparse.ArgumentTypeError(f"{raw!r}: bot ids are whole numbers from 1")
    return ids


def read_password() -> str:
    """At a prompt (twice) on a terminal, else from MAMMUT_SMS_PASSWORD."""
    if not sys.stdin.isatty():
        password = os.environ.get(PASSWORD_VARIABLE, "")
        if not password:
            raise operators.InvalidOperator(f"no terminal to ask on: set {PASSWORD_VARIABLE}")
        return password
    password = getpass.getpass("password: ")
    if getpass.getpass("again: ") != password:
        raise operators.InvalidOperator("the two passwords differ")
    return password


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    engine = get_engine(settings)
    try:
        return _ACTIONS[args.action](args, engine, settings)
    except operators.InvalidOperator as error:
        print(f"mammut-sms operators {args.action}: {error}", file=sys.stderr)
        return 1


def _add(args: argparse.Namespace, engine: Any, settings: Settings) -> int:
    password = read_password()
    with transaction(engine) as connection:
        if missing := _unknown_bots(connection, args.bots):
            raise operators.InvalidOperator(f"no bot with id {', '.join(map(str, missing))}")
        added = operators.add(connection, args.email, args.role, args.bots, password)
    print(f"added {added.email} ({added.role}, {_scope(added.bots)})")
    return 0


def _list(args: argparse.Namespace, engine: Any, settings: Settings) -> int:
    with engine.connect() as connection:
        accounts = operators.list_all(connection)
    for account in accounts:
        print(f"{account.email}  {account.role}  {_scope(account.bots)}")
    if not accounts:
        print("no operators (add one: mammut-sms operators add EMAIL --role admin)")
    return 0


def _remove(args: argparse.Namespace, engine: Any, settings: Settings) -> int:
    with transaction(engine) as connection:
        removed = operators.remove(connection, args.email)
    if removed is None:
        raise operators.InvalidOperator(f"no account {args.email}")
    ended = sessions.end_all(connect(settings.redis_url), removed.id)
    print(f"removed {removed.email}; {ended} session(s) ended")
    return 0


def _reset(args: argparse.Namespace, engine: Any, settings: Settings) -> int:
    password = read_password()
    with transaction(engine) as connection:
        changed = operators.set_password(connection, args.email, password)
    if changed is None:
        raise operators.InvalidOperator(f"no account {args.email}")
    ended = sessions.end_all(connect(settings.redis_url), changed.id)
    print(f"new password for {changed.email}; {ended} session(s) ended")
    return 0


def _unknown_bots(connection: Any, bot_ids: list[int]) -> list[int]:
    known = set(connection.execute(select(bots.c.id).where(bots.c.id.in_(bot_ids))).scalars())
    return sorted(set(bot_ids) - known)


def _scope(bots: tuple[int, ...] | list[int]) -> str:
    return "bots " + ",".join(map(str, bots)) if bots else "every bot"


_ACTIONS = {"add": _add, "list": _list, "remove": _remove, "reset-password": _reset}
