"""`mammut-sms handoff pause|resume --bot ID --with E164`: hand a conversation to a human, or give it back."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cli.bots import RegistryError, _print_json, add_registry_options, client_from


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "handoff", help="hand a person's conversation to a human, or give it back to the bot",
        description="Pause the bot for one person (their texts are logged, and forwarded to the bot's handoff-url "
                    "if it has one, but the engine is not asked) until resumed or the bot's handoff-timeout "
                    "passes; or resume it.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text in (("pause", "the engine stops answering the person; a human takes over"),
                              ("resume", "the engine answers the person again")):
        sub = actions.add_parser(action, help=help_text, description=help_text)
        sub.add_argument("--bot", type=int, required=True, metavar="ID", help="the bot's id")
        sub.add_argument("--with", dest="person", required=True, metavar="E164", help="the person's number")
        if action == "pause":
            sub.add_argument("--note", default=None, help="why, or who has it (shown with the conversation)")
        add_registry_options(sub)
        sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        answer = client_from(args).handoff(args.bot, args.person, args.action == "pause", getattr(args, "note", None))
    except RegistryError as error:
        print(f"mammut-sms handoff: {error}", file=sys.stderr)
        return 1
    _print_json(answer["data"])
    return 0
