"""`mammut-sms bots list|show|create|update|delete`: the registry API from the command line."""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import os
import sys
from typing import Any
from urllib.parse import quote, urlsplit

import requests

DEFAULT_APP = "mammut-1"
TIMEOUT = (5.0, 30.0)

# Flag -> the registry's own field name (shared/bots.py spells them this way in the API).
_FIELD_FLAGS = {
    "name": "name",
    "account_sid": "twilio-account-sid",
    "auth_token": "twilio-auth-token",
    "number": "main-phone-number",
    "engine_url": "engine-url",
    "messages_per_second": "messages-per-second",
    "fallback_message": "fallback-message",
    "messaging_service_sid": "twilio-messaging-service-sid",
    "phone_numbers": "phone-numbers",
    "validity_period": "validity-period",
    "smart_encoded": "smart-encoded",
    "shorten_urls": "shorten-urls",
}


# `--auth-token` given alone: prompt for it (a token on the command line shows in `ps` and shell history).
PROMPT = "\0prompt"
AUTH_TOKEN_VARIABLE = "TWILIO_AUTH_TOKEN"


def twilio_auth_token(given: str | None, ask: bool) -> str | None:
    """The Twilio auth token: as given, else from $TWILIO_AUTH_TOKEN, else typed at a prompt (when
    `ask` or `--auth-token` came alone, and a terminal is there to type it)."""
    if given and given != PROMPT:
        return given
    if os.environ.get(AUTH_TOKEN_VARIABLE):
        return os.environ[AUTH_TOKEN_VARIABLE]
    if (ask or given == PROMPT) and sys.stdin.isatty():
        return getpass.getpass("Twilio auth token (not echoed): ") or None
    return None


def add_auth_token_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--auth-token", nargs="?", const=PROMPT, default=None, metavar="TOKEN",
                        help=f"{help_text}; better: set ${AUTH_TOKEN_VARIABLE}, or give --auth-token alone to be "
                             "prompted (a token on the command line shows in ps and shell history)")


def is_loopback(host: str | None) -> bool:
    if host in (None, "", "localhost") or (host or "").endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # type: ignore[arg-type]
    except ValueError:
        return False


def warn_if_plain_http(url: str, what: str) -> None:
    """Say so before a bearer token goes over plain http:// to another machine (anyone on the way reads it)."""
    parts = urlsplit(url)
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        print(f"mammut-sms: warning: sending {what} over plain http:// to {parts.hostname}: anyone on the network "
              "path can read it; use https://", file=sys.stderr)


class RegistryError(Exception):
    """The registry refused a call or could not be reached; the message says why."""


def default_service_url() -> str:
    """The running service: PUBLIC_URL when this runs with the service's environment, else a local one."""
    return (os.environ.get("PUBLIC_URL") or f"http://localhost:{os.environ.get('PORT') or 5000}").rstrip("/")


def service_root(url: str) -> str:
    """The service's base URL from `url`: itself, or the base of the webhook's URL when given that.
    A path prefix stays (a proxy serving the service under /prefix serves the registry there too)."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    webhook = "/channels/sms"
    if path.endswith(webhook):
        path = path[: -len(webhook)]
    return f"{parts.scheme}://{parts.netloc}{path}"


class RegistryClient:
    def __init__(self, url: str, token: str | None, app_id: str = DEFAULT_APP) -> None:
        self.root = service_root(url)
        self.token = token
        self.app_id = app_id
        self._session = requests.Session()
        self._session.trust_env = False  # a local service must not go through the developer's proxy
        self._warned = False

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/graph/user")["data"]["user"]

    def show(self, bot_id: int) -> dict[str, Any]:
        return self._call("GET", f"/graph/user:{bot_id}")["data"]["user"][0]

    def find_by_number(self, number: str) -> dict[str, Any] | None:
        """The bot that answers on `number`: its main-phone-number or one of its phone-numbers."""
        return next((bot for bot in self.list()
                     if number == bot.get("main-phone-number") or number in (bot.get("phone-numbers") or [])), None)

    def create(self, fields: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/graph/user", json={"user-type": "machine", **fields})

    def update(self, bot_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"/graph/user:{bot_id}", json=fields)

    def delete(self, bot_id: int) -> dict[str, Any]:
        return self._call("DELETE", f"/graph/user:{bot_id}")

    def messages(self, bot_id: int, person: str, limit: int = 100) -> list[dict[str, Any]]:
        """The latest `limit` messages with `person`, oldest first (the log pages; its newest page is the one wanted)."""
        newest = self._call("GET", f"/graph/user:{bot_id}/messages?with={quote(person)}&order=newest&limit={limit}")
        return list(reversed(newest["data"]["messages"]))

    def send(self, bot_id: int, to: str, text: str | None, media_url: str | None = None,
             idempotency_key: str | None = None) -> dict[str, Any]:
        """Text `to` from the bot's number, without the engine; the answer names the queued reply ids."""
        body = {"to": to, "text": text, "media-url": media_url}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", f"/graph/user:{bot_id}/messages", json=body, headers=headers)

    def handoff(self, bot_id: int, person: str, pause: bool, note: str | None = None) -> dict[str, Any]:
        """Hand the conversation with `person` to a human (pause) or give it back to the bot."""
        path = f"/graph/user:{bot_id}/conversations/{quote(person)}/handoff"
        return self._call("POST", path, json={"note": note} if note else None) if pause else self._call("DELETE", path)

    def _call(self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
        if not self.token:
            raise RegistryError("the registry needs the admin token: pass --token or set ADMIN_API_TOKEN")
        url = f"{self.root}/app:{self.app_id}{path}"
        if not self._warned:
            warn_if_plain_http(url, "the admin token")
            self._warned = True
        try:
            response = self._session.request(method, url, json=json, timeout=TIMEOUT,
                                             headers={"Authorization": f"Bearer {self.token}", **(headers or {})})
        except requests.RequestException as error:
            raise RegistryError(f"cannot reach {self.root}: {error.__class__.__name__} (is the service running?)") from None
        try:
            body = response.json()
        except ValueError:
            raise RegistryError(f"{method} {url}: HTTP {response.status_code}, not a registry answer") from None
        if response.status_code >= 400 or body.get("status") != "Success":
            raise RegistryError(f"HTTP {response.status_code}: {body.get('message') or body}")
        return body


# --- command line ---------------------------------------------------------------------------


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="the service's base URL (default: $PUBLIC_URL, else http://localhost:$PORT or :5000)")
    parser.add_argument("--token", default=None, help="the registry's bearer token (default: $ADMIN_API_TOKEN)")
    parser.add_argument("--app", default=None, help="the Mammut application id (default: $APP_ID or mammut-1)")


def client_from(args: argparse.Namespace) -> RegistryClient:
    return RegistryClient(
        args.url or default_service_url(),
        args.token or os.environ.get("ADMIN_API_TOKEN"),
        args.app or os.environ.get("APP_ID") or DEFAULT_APP,
    )


def _field_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="the bot's name")
    parser.add_argument("--account-sid", help="Twilio account SID (AC + 32 hex digits)")
    add_auth_token_option(parser, "the Twilio account's primary auth token (stored encrypted, never shown)")
    parser.add_argument("--number", help="the bot's Twilio number, E.164 (e.g. +15551234567)")
    parser.add_argument("--engine-url", help="the bot's engine (Rasa REST protocol); default: ENGINE_URL or echo")
    parser.add_argument("--messages-per-second", type=float, help="send pace of the bot's number, in segments/s")
    parser.add_argument("--fallback-message", help="sent when the engine fails")
    parser.add_argument("--messaging-service-sid", help="the Twilio Messaging Service the bot sends through (MG + 32 "
                                                        "hex digits); with it, --number is optional")
    parser.add_argument("--phone-numbers", type=_numbers, metavar="E164[,E164...]",
                        help="the bot's numbers besides --number, comma-separated ('' clears them)")
    parser.add_argument("--validity-period", type=int, metavar="SECONDS",
                        help="seconds a message may wait in Twilio's queue before it fails (1-36000)")
    parser.add_argument("--smart-encoded", type=_flag, metavar="true|false",
                        help="Twilio replaces Unicode look-alikes with GSM-7 characters")
    parser.add_argument("--shorten-urls", type=_flag, metavar="true|false",
                        help="Twilio shortens links (needs a messaging service with link shortening)")
    parser.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                        help="any other user field (repeatable)")


def _numbers(raw: str) -> list[str]:
    return [number.strip() for number in raw.split(",") if number.strip()]


def _flag(raw: str) -> bool:
    if raw.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"true or false, not {raw!r}")
    return raw.lower() == "true"


def add_parser(subparsers: Any) -> None:
    bots = subparsers.add_parser("bots", help="list, show, create, update and delete bots over the registry API",
                                 description="Manage bots through the running service's registry API.")
    actions = bots.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="every bot", description="List every bot (auth tokens are never shown).")
    listing.add_argument("--json", action="store_true", help="print the registry's JSON instead of a table")
    show = actions.add_parser("show", help="one bot, as JSON", description="Show one bot as JSON.")
    show.add_argument("bot_id", type=int, metavar="ID")
    create = actions.add_parser("create", help="register a bot for a Twilio number",
                                description="Register a bot (a Mammut machine user) for a Twilio number. "
                                            "--name, --account-sid, --auth-token and --number (or "
                                            "--messaging-service-sid) are required.")
    _field_options(create)
    update = actions.add_parser("update", help="change some of a bot's fields",
                                description="Change the given fields of a bot; the others stay as they are.")
    update.add_argument("bot_id", type=int, metavar="ID")
    _field_options(update)
    delete = actions.add_parser("delete", help="delete a bot", description="Delete a bot and free its number.")
    delete.add_argument("bot_id", type=int, metavar="ID")
    for parser in (listing, show, create, update, delete):
        add_registry_options(parser)
        parser.set_defaults(run=run)


def fields_from(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for flag, name in _FIELD_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            fields[name] = value
    for pair in args.field:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise RegistryError(f"--field takes NAME=VALUE, not {pair!r}")
        fields[name] = value
    return fields


def run(args: argparse.Namespace) -> int:
    client = client_from(args)
    if args.action in ("create", "update"):
        # A create needs it (so it is asked for); an update changes it only when --auth-token is given.
        args.auth_token = twilio_auth_token(args.auth_token, ask=args.action == "create") if (
            args.action == "create" or args.auth_token) else None
    try:
        if args.action == "list":
            _print_list(client.list(), as_json=args.json)
        elif args.action == "show":
            _print_json(client.show(args.bot_id))
        elif args.action == "create":
            _print_json(client.create(_required(fields_from(args))))
        elif args.action == "update":
            fields = fields_from(args)
            if not fields:
                raise RegistryError("nothing to update: give at least one field (see --help)")
            _print_json(client.update(args.bot_id, fields))
        elif args.action == "delete":
            _print_json(client.delete(args.bot_id))
    except RegistryError as error:
        print(f"mammut-sms bots {args.action}: {error}", file=sys.stderr)
        return 1
    return 0


def _required(fields: dict[str, Any]) -> dict[str, Any]:
    missing = [flag for flag in ("name", "account_sid", "auth_token") if _FIELD_FLAGS[flag] not in fields]
    if _FIELD_FLAGS["number"] not in fields and _FIELD_FLAGS["messaging_service_sid"] not in fields:
        missing.append("number")
    if missing:
        raise RegistryError("missing " + ", ".join("--" + flag.replace("_", "-") for flag in missing))
    return fields


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _print_list(bots: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        _print_json(bots)
        return
    if not bots:
        print("no bots yet: mammut-sms bots create --help")
        return
    rows = [("ID", "NUMBER", "NAME", "ENGINE")] + [
        (str(bot["id"]), bot.get("main-phone-number") or bot.get("twilio-messaging-service-sid") or "", bot.get("name") or "", bot.get("engine-url") or "(default)")
        for bot in bots
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
