"""`mammut-sms dlq list|replay`: the replies that failed for good, shown and sent again.

Runs with the service's environment (DATABASE_URL, REDIS_URL), e.g. `heroku run mammut-sms dlq list`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from shared.db import get_engine
from shared import dlq as dead_letters
from shared.phone import mask
from shared.redis import connect
from shared.settings import Settings
from shared.tasks import make_broker


def add_parser(subparsers: Any) -> None:
    dlq = subparsers.add_parser(
        "dlq", help="list or replay dead-lettered replies",
        description="Replies that failed for good (bad number, retries used up) are kept in the database until "
                    "replayed; sends that died of an unexpected error, and handoff forwards and resends that "
                    "never got through, are kept 7 days by Dramatiq. "
                    "Run with the service's environment (DATABASE_URL and REDIS_URL).",
    )
    actions = dlq.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every dead-lettered reply", description="List dead-lettered replies.")
    listing.add_argument("--json", action="store_true", help="print JSON, numbers unmasked")
    replay = actions.add_parser("replay", help="send dead-lettered replies again",
                                description="Queue dead-lettered replies again, in their conversations' order.")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="replay every dead-lettered reply")
    which.add_argument("ids", nargs="*", default=[], metavar="ID", help="message or reply ids from `dlq list`")
    for parser in (listing, replay):
        parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()

    engine = get_engine(settings)  # Settings.from_env refused to go on without DATABASE_URL (bar development)
    redis = connect(settings.redis_url)
    broker = make_broker(settings.redis_url)
    try:
        if args.action == "list":
            _print(dead_letters.list_dead_letters(redis, broker, engine), as_json=args.json)
            return 0
        replayed = dead_letters.replay(redis, broker, ids=None if args.all else args.ids, engine=engine)
    finally:
        broker.close()
    print(f"replayed {len(replayed)}: {' '.join(replayed)}" if replayed else "nothing replayed (see: mammut-sms dlq list)")
    return 0 if replayed or args.all else 1


def _print(entries: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
        return
    if not entries:
        print("no dead letters")
        return
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["failed_at"]))
        code = f" code {entry['error_code']}" if entry.get("error_code") else ""
        print(f"{entry['id']}  {when}  bot {entry['bot_id']} -> {mask(entry['to'])}  {entry['reason']}{code}  "
              f"after {entry['attempts']} attempt(s): {entry.get('text') or ''!r}")
