"""`mammut-sms send --bot ID --to +E164 "text"`: text a person as the bot, without the engine."""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

from cli.bots import RegistryError, _print_json, add_registry_options, client_from


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "send", help="text a person from a bot's number, without the engine",
        description="Queue a message from the bot to a person, as an engine's reply would be (in order, paced, "
                    "logged as the operator's). The request carries an Idempotency-Key, so a retry after a "
                    "timeout never texts twice.",
    )
    parser.add_argument("--bot", type=int, required=True, metavar="ID", help="the bot's id")
    parser.add_argument("--to", required=True, metavar="E164", help="the person's number")
    parser.add_argument("text", nargs="?", default=None, help="the message")
    parser.add_argument("--media-url", default=None, help="an https:// image to send with it")
    parser.add_argument("--idempotency-key", default=None, help="default: a new one for this command")
    parser.add_argument("--at", default=None, metavar="RFC3339",
                        help="send then, not now: e.g. 2026-12-24T09:00:00-06:00 (at most 30 days ahead); "
                             "list with the API's GET .../scheduled, cancel with DELETE .../scheduled/ID")
    add_registry_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        answer = client_from(args).send(args.bot, args.to, args.text, args.media_url,
                                        args.idempotency_key or uuid.uuid4().hex, send_at=args.at)
    except RegistryError as error:
        print(f"mammut-sms send: {error}", file=sys.stderr)
        return 1
    _print_json(answer["data"])
    return 0
