"""`mammut-sms migrate`: bring the database's schema to this release's (Heroku's release phase runs
it), and copy an earlier release's Redis layout into it, once, before this release's processes start."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import redis as redis_lib

from shared.db import migrate
from shared.redis import connect
from shared.settings import Settings, redacted_url


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "migrate", help="create or upgrade the database's tables",
        description="Apply the database migrations this release needs (idempotent: an up-to-date database is left "
                    "as it is). Uses DATABASE_URL; without it in development, SQLite in the working directory. "
                    "When REDIS_URL holds the data of a release that kept everything in Redis, not yet copied, it "
                    "then copies it into the database (once: a later run copies nothing).",
    )
    parser.add_argument("--from-redis", action="store_true",
                        help="copy from the Redis layout of earlier releases even if it does not look like one "
                             "(and fail if Redis cannot be reached); running it again copies nothing")
    parser.add_argument("--purge-redis", action="store_true",
                        help="then delete the earlier release's keys from Redis (once copied: its bot records hold "
                             "engine URLs in plain text)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    assert settings.database_url is not None
    before, now = migrate(settings.database_url)
    where = redacted_url(settings.database_url)
    print(f"database {where}: " + (f"already at {now}" if before == now else f"migrated from {before or 'empty'} to {now}"))
    from cli import from_redis

    try:
        if args.from_redis or _waiting(settings):
            _copy(settings)
        if args.purge_redis:
            print(f"deleted {from_redis.purge(settings)} key(s) of the earlier release's Redis layout")
    except from_redis.CopyRefused as refused:
        print(f"mammut-sms migrate: {refused}", file=sys.stderr)
        return 1
    except redis_lib.RedisError as error:
        print(f"mammut-sms migrate: Redis at {redacted_url(settings.redis_url)}: {error}", file=sys.stderr)
        return 1
    return 0


def _waiting(settings: Settings) -> bool:
    """Whether an earlier release's data waits in Redis. In development an unreachable Redis holds
    none; elsewhere the release phase must know (else the new processes start without its bots)."""
    from cli.from_redis import waiting

    try:
        redis = connect(settings.redis_url)
        try:
            return waiting(redis)
        finally:
            redis.close()
    except redis_lib.ConnectionError:
        if not settings.development:
            raise
        print(f"Redis at {redacted_url(settings.redis_url)} not reachable: no earlier release's data looked for")
        return False


def _copy(settings: Settings) -> None:
    from cli.from_redis import copy_from_redis

    copied = copy_from_redis(settings)
    if copied.migrated_at is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(copied.migrated_at))
        print(f"the earlier release's Redis layout was copied on {when}: nothing copied "
              "(`mammut-sms migrate --purge-redis` deletes its keys)")
        return
    for note in copied.notes:
        print(note)
    print(copied.summary())
