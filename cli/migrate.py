"""`mammut-sms migrate`: bring the database's schema to this release's (Heroku's release phase runs it)."""

from __future__ import annotations

import argparse
from typing import Any

from shared.db import migrate
from shared.settings import Settings, redacted_url


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "migrate", help="create or upgrade the database's tables",
        description="Apply the database migrations this release needs (idempotent: an up-to-date database is left "
                    "as it is). Uses DATABASE_URL; without it in development, SQLite in the working directory.",
    )
    parser.add_argument("--from-redis", action="store_true",
                        help="then copy bots, opt-outs, the conversation log and dead letters from the Redis layout "
                             "of earlier releases (REDIS_URL) into the database; running it again copies nothing new")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    assert settings.database_url is not None
    before, now = migrate(settings.database_url)
    where = redacted_url(settings.database_url)
    print(f"database {where}: " + (f"already at {now}" if before == now else f"migrated from {before or 'empty'} to {now}"))
    if args.from_redis:
        from cli.from_redis import copy_from_redis

        print(copy_from_redis(settings).summary())
    return 0
