"""The `mammut-sms` console script: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli import bots, dev, dlq, handoff, migrate, operators, send, simulate, worker
from shared.settings import SettingsError

DESCRIPTION = """\
The SMS channel for Mammut chatbots.

  mammut-sms dev                 run everything locally (no Redis or Twilio account needed)
  mammut-sms simulate --to BOT --from ME "hola"
                                 text a bot without a phone and print its replies
  mammut-sms bots list           manage bots over the registry API
  mammut-sms send --bot 1 --to +15551230001 "hola"
                                 text a person as the bot, without the engine
  mammut-sms handoff pause --bot 1 --with +15551230001
                                 hand a conversation to a human (`handoff resume` gives it back)
  mammut-sms dlq list            replies that failed for good; `dlq replay` sends them again
  mammut-sms operators add EMAIL --role operator --bots 1
                                 an account for the console (/console/); list, remove, reset-password
  mammut-sms migrate             create or upgrade the database's tables (Heroku: the release phase)
  mammut-sms worker              run the Dramatiq worker (WORKER_POOL=threads|gevent; the Procfile's worker)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mammut-sms", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (dev, simulate, bots, send, handoff, dlq, operators, migrate, worker):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except SettingsError as error:  # a command that needs the service's environment, without it
        print(f"mammut-sms {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
