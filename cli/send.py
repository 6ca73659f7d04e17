"""`mammut-sms send --bot ID --to +E164 "text"`: text a person as the bot, without the engine."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

from cli.bots import RegistryError, _print_json, add_registry_options, client_from


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "send", help="text a person from a bot's number, without the engine",
        description="Queue a message from the bot to a person, as an engine's reply would be (in order, paced, "
                    "logged as the operator's). The request carries an Idempotency-Key made from what is sent "
                    "(bot, number, text, media), so running the same command again after a timeout never texts "
                    "twice within 24 hours; to send the very same text again on purpose, give another "
                    "--idempotency-key.",
    )
    parser.add_argument("--bot", type=int, required=True, metavar="ID", help="the bot's id")
    parser.add_argument("--to", required=True, metavar="E164", help="the person's number")
    parser.add_argument("text", nargs="?", default=None, help="the message")
    parser.add_argument("--media-url", default=None, help="an https:// image to send with it")
    parser.add_argument("--idempotency-key", default=None,
                        help="default: derived from the bot, the number, the text and the media URL")
    add_registry_options(parser)
    parser.set_defaults(run=run)


def content_key(bot_id: int, to: str, text: str | None, media_url: str | None) -> str:
    """The same message to the same person from the same bot: the same key, whenever it is run."""
    content = json.dumps([bot_id, to, text, media_url], ensure_ascii=False).encode()
    return "cli-" + hashlib.sha256(content).hexdigest()[:40]


def run(args: argparse.Namespace) -> int:
    try:
        answer = client_from(args).send(args.bot, args.to, args.text, args.media_url,
                                        args.idempotency_key or content_key(args.bot, args.to, args.text,
                                                                            args.media_url))
    except RegistryError as error:
        print(f"mammut-sms send: {error}", file=sys.stderr)
        return 1
    _print_json(answer["data"])
    return 0
