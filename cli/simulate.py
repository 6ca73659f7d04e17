"""`mammut-sms simulate`: text a bot without a phone.

Posts the form Twilio would post, signed as Twilio signs it, to the running service, then prints
the bot's replies from the conversation log as they are sent. Run with the service's environment
(`heroku run mammut-sms simulate ...`) it reads the bot and its auth token from the store;
anywhere else `--auth-token` gives the token, which the registry API never reveals.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from twilio.request_validator import RequestValidator

from cli.bots import (AUTH_TOKEN_VARIABLE, DEFAULT_APP, RegistryClient, RegistryError, add_auth_token_option,
                      twilio_auth_token)
from shared.phone import InvalidNumber, normalize_e164

WEBHOOK_PATH = "/channels/sms/"
DEFAULT_URL = "http://localhost:5000"
# The body of the webhook's own 404 (webhook/inbound.py); any other 404 means the URL is wrong.
UNKNOWN_NUMBER = "unknown_number"
POLL_SECONDS = 0.3
# Replies to one message go out within moments of each other: this long without a new one ends the wait.
QUIET_SECONDS = 3.0
# Statuses at which a reply has left us (see shared/messagelog.STATUS_RANK).
SENT = frozenset({"accepted", "queued", "sending", "sent", "delivered", "read", "failed", "undelivered"})


class SimulateError(Exception):
    """Something the operator must fix; the message says what."""


@dataclass(frozen=True)
class Target:
    """What simulate needs to know about the bot: where its token came from says how it was found."""

    bot_id: int | None
    account_sid: str
    auth_token: str


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate", help="send a signed inbound SMS to a running service and print the bot's replies",
        description="Send the webhook Twilio would send for an SMS from --from to --to, signed with the bot's "
                    "auth token, then print the bot's replies as they are sent. With the service's environment "
                    "(DATABASE_URL, REDIS_URL, CREDENTIALS_KEY) the bot and its token come from the store; "
                    "otherwise give --auth-token (and the admin token, to see replies).",
    )
    parser.add_argument("text", help="the message's text")
    parser.add_argument("--to", required=True, help="the bot's number, E.164")
    parser.add_argument("--from", dest="sender", required=True, metavar="FROM", help="the texting person's number, E.164")
    parser.add_argument("--url", default=None,
                        help=f"the service's base URL, such as {DEFAULT_URL} or https://host/prefix, or its webhook "
                             f"URL (the base + {WEBHOOK_PATH}) (default: $PUBLIC_URL, else {DEFAULT_URL})")
    add_auth_token_option(parser, "the bot's Twilio auth token, when the store is not reachable from here")
    parser.add_argument("--account-sid", default=None, help="the bot's Twilio account SID (default: from the registry)")
    parser.add_argument("--bot-id", type=int, default=None, help="the bot's id (default: found by --to)")
    parser.add_argument("--admin-token", default=None,
                        help="the registry's bearer token, to read replies (default: $ADMIN_API_TOKEN)")
    parser.add_argument("--app", default=None, help="the Mammut application id (default: $APP_ID or mammut-1)")
    parser.add_argument("--wait", type=float, default=15.0, help="seconds to wait for replies (default 15; 0: don't)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        return simulate(args, print)
    except SimulateError as error:
        print(f"mammut-sms simulate: {error}", file=sys.stderr)
        return 1


def simulate(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    to, sender = _number(args.to, "--to"), _number(args.sender, "--from")
    url = webhook_url(args.url or os.environ.get("PUBLIC_URL") or DEFAULT_URL)
    registry = RegistryClient(url, args.admin_token or os.environ.get("ADMIN_API_TOKEN"),
                              args.app or os.environ.get("APP_ID") or DEFAULT_APP)
    target = find_target(args, to, registry)
    form = twilio_form(target.account_sid, sender, to, args.text)
    signed_over = signed_url(url)
    response = post_signed(url, signed_over, form, target.auth_token)
    if response.status_code != 200:
        raise SimulateError(_refusal(response, url, signed_over, to))
    say(f"> {sender} -> {to}: {args.text}  (MessageSid {form['MessageSid']}, accepted)")
    if args.wait <= 0:
        return 0
    if target.bot_id is None or not registry.token:
        say("(replies not shown: give --admin-token or set ADMIN_API_TOKEN to read the conversation log)")
        return 0
    replies = watch_replies(registry, target.bot_id, sender, form["MessageSid"], args.wait, say)
    if not replies:
        say(f"(no reply within {args.wait:g} s; the service's logs say why)")
    return 0


def webhook_url(given: str) -> str:
    """The URL to post to: `given` when it is the webhook's (either spelling), else `given` is a base URL."""
    parts = urlsplit(given.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SimulateError(f"--url: {given!r} is not an http(s) URL; give the service's base URL, "
                            f"such as {DEFAULT_URL}")
    path = parts.path.rstrip("/")
    if path.endswith(WEBHOOK_PATH.rstrip("/")):
        return urlunsplit(parts._replace(fragment=""))
    return urlunsplit(parts._replace(path=path + WEBHOOK_PATH, fragment=""))


def signed_url(url: str) -> str:
    """The URL the service validates: with PUBLIC_URL set, PUBLIC_URL and the webhook's path as it was called."""
    public = (os.environ.get("PUBLIC_URL") or "").rstrip("/")
    if not public:
        return url
    parts = urlsplit(url)
    path = WEBHOOK_PATH if parts.path.endswith("/") else WEBHOOK_PATH.rstrip("/")
    return public + path + ("?" + parts.query if parts.query else "")


def find_target(args: argparse.Namespace, to: str, registry: RegistryClient) -> Target:
    """The bot's id, account and token: from the store when it is reachable, else from the options and registry."""
    from_store = _from_store(to)
    if from_store is not None:
        return from_store
    auth_token = twilio_auth_token(args.auth_token, ask=True)
    if not auth_token:
        raise SimulateError(
            f"the bot's Twilio auth token is needed to sign the webhook: set ${AUTH_TOKEN_VARIABLE} or pass "
            "--auth-token (alone, to be prompted), or run with the "
            "service's environment (DATABASE_URL, REDIS_URL and CREDENTIALS_KEY) so it is read from the store"
        )
    bot_id, account_sid = args.bot_id, args.account_sid
    if (bot_id is None or account_sid is None) and registry.token:
        bot = _show(registry, bot_id) if bot_id is not None else _by_number(registry, to)
        bot_id, account_sid = bot["id"], account_sid or bot["twilio-account-sid"]
    if account_sid is None:
        raise SimulateError("the bot's account SID is needed: pass --account-sid, or --admin-token to look it up")
    return Target(bot_id, account_sid, auth_token)


def _show(registry: RegistryClient, bot_id: int) -> dict[str, Any]:
    try:
        return registry.show(bot_id)
    except RegistryError as error:
        raise SimulateError(f"cannot look bot {bot_id} up: {error}") from None


def _by_number(registry: RegistryClient, to: str) -> dict[str, Any]:
    try:
        bot = registry.find_by_number(to)
    except RegistryError as error:
        raise SimulateError(f"cannot look the bot up: {error}") from None
    if bot is None:
        raise SimulateError(f"no bot has the number {to} (mammut-sms bots list)")
    return bot


def _from_store(to: str) -> Target | None:
    """The bot as the service sees it, with its DATABASE_URL and REDIS_URL here; None when it is not reachable."""
    if not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")):
        return None
    from sqlalchemy.exc import SQLAlchemyError

    from shared.bots import BotStore
    from shared.crypto import Vault
    from shared.db import get_engine
    from shared.redis import connect
    from shared.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
        store = BotStore(get_engine(settings), connect(settings.redis_url), Vault(settings.credentials_keys))
        bot = store.by_number(to)
    except (SettingsError, SQLAlchemyError, ValueError):
        return None  # not the service's environment after all: fall back to the options
    if bot is None:
        raise SimulateError(f"no bot has the number {to} in the database at DATABASE_URL")
    return Target(bot.id, bot.account_sid, bot.auth_token)


def twilio_form(account_sid: str, sender: str, to: str, text: str) -> dict[str, str]:
    """The fields Twilio posts for a plain SMS (https://www.twilio.com/docs/messaging/guides/webhook-request)."""
    sid = "SM" + uuid.uuid4().hex
    return {
        "ToCountry": "US", "ToState": "", "SmsMessageSid": sid, "NumMedia": "0", "ToCity": "", "FromZip": "",
        "SmsSid": sid, "FromState": "", "SmsStatus": "received", "FromCity": "", "Body": text, "FromCountry": "US",
        "To": to, "ToZip": "", "NumSegments": "1", "MessageSid": sid, "AccountSid": account_sid, "From": sender,
        "ApiVersion": "2010-04-01",
    }


def post_signed(url: str, signed_over: str, form: dict[str, str], auth_token: str) -> requests.Response:
    signature = RequestValidator(auth_token).compute_signature(signed_over, form)
    headers = {"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1 (mammut-sms simulate)",
               "I-Twilio-Idempotency-Token": uuid.uuid4().hex}
    try:
        with requests.Session() as session:
            session.trust_env = False
            return session.post(url, data=form, headers=headers, timeout=(5, 15), allow_redirects=False)
    except requests.RequestException as error:
        raise SimulateError(f"cannot reach {url}: {error.__class__.__name__} (is the service running?)") from None


def _refusal(response: requests.Response, url: str, signed_over: str, to: str) -> str:
    if response.status_code == 404 and not _is_unknown_number(response):
        root = urlunsplit(urlsplit(url)[:2] + ("", "", ""))
        return (f"nothing at {url} takes the webhook (HTTP 404): the URL is wrong. --url takes the service's base "
                f"URL, such as {root}, or its webhook URL, such as {root}{WEBHOOK_PATH}")
    text = f"the service answered HTTP {response.status_code}: {response.text.strip()[:200]}"
    if response.status_code == 403:
        text += (f"\n  signed over {signed_over}; the service validates PUBLIC_URL + {WEBHOOK_PATH} when PUBLIC_URL "
                 "is set, else the URL it was called at. Check the auth token and PUBLIC_URL on both sides.")
    elif response.status_code == 404:
        text += f"\n  no bot has the number {to} (mammut-sms bots list)"
    return text


def _is_unknown_number(response: requests.Response) -> bool:
    """The webhook's own 404 is its bare reason (webhook/twilio_auth.refusal); Flask's is a JSON failure."""
    return response.text.strip() == UNKNOWN_NUMBER


def watch_replies(registry: RegistryClient, bot_id: int, sender: str, message_sid: str, wait: float,
                  say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Print the bot's replies to `message_sid` as they are sent, until they stop or `wait` runs out."""
    deadline = time.monotonic() + wait
    shown: dict[str, dict[str, Any]] = {}
    last_news = None
    while time.monotonic() < deadline:
        try:
            entries = registry.messages(bot_id, sender)
        except RegistryError as error:
            raise SimulateError(f"cannot read the conversation log: {error}") from None
        replies = replies_to(entries, message_sid)
        for reply in replies:
            status = reply.get("status") or "pending"
            if status in SENT and reply["id"] not in shown:
                shown[reply["id"]] = reply
                last_news = time.monotonic()
                say(f"< {status}: {reply.get('text') or ''}" + _media(reply))
        waiting = any(reply["id"] not in shown for reply in replies)
        if last_news is not None and not waiting and time.monotonic() - last_news > QUIET_SECONDS:
            break
        time.sleep(POLL_SECONDS)
    return list(shown.values())


def replies_to(entries: list[dict[str, Any]], message_sid: str) -> list[dict[str, Any]]:
    """The outbound entries logged after our inbound one (the log is oldest first)."""
    ids = [entry.get("id") for entry in entries]
    if message_sid not in ids:
        return []
    return [entry for entry in entries[ids.index(message_sid) + 1:] if entry.get("direction") == "out"]


def _media(reply: dict[str, Any]) -> str:
    urls = [media.get("url") for media in reply.get("media") or [] if media.get("url")]
    return f" [media: {', '.join(urls)}]" if urls else ""


def _number(value: str, option: str) -> str:
    try:
        return normalize_e164(value)
    except InvalidNumber as error:
        raise SimulateError(f"{option}: {error}") from None
