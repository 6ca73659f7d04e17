"""Twilio's REST API through twilio-python: one client per (account, token) per thread, reused.

A client holds a requests Session, so reusing it keeps connections to Twilio alive between sends;
one per thread because a Session is not documented as thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from shared.bots import Bot
from shared.settings import Settings
from worker.http import read_environment_once

# Dramatiq's TimeLimit cannot interrupt a blocked socket, so every call carries its own limits.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0
STATUS_CALLBACK_PATH = "/channels/sms/status"
# Twilio's date_created has second precision, and our clocks may differ from Twilio's a little.
CLOCK_MARGIN_SECONDS = 5.0
LIST_PAGE_SIZE = 50

_local = threading.local()


@dataclass(frozen=True)
class Accepted:
    """Twilio took the message: its SID and the status it answered with."""

    sid: str
    status: str


@dataclass(frozen=True)
class Sender:
    """Who a message goes from: a number (`from_`), a Messaging Service (which picks a number from
    its pool when `from_` is None), or both; with the bot's send options (None: not sent)."""

    from_: str | None
    messaging_service_sid: str | None = None
    validity_period: int | None = None
    smart_encoded: bool | None = None
    shorten_urls: bool | None = None

    @property
    def pace_key(self) -> str:
        """What the send is paced on: the service (its campaign's throughput), else the number."""
        return self.messaging_service_sid or self.from_ or ""

    @property
    def opt_out_key(self) -> str:
        """Whose opt-outs the send honours: the service's, when it goes through one (Bot.opt_out_key),
        else the number it goes from."""
        return self.messaging_service_sid or self.from_ or ""

    def options(self) -> dict[str, object]:
        """Messages.create's arguments for the sender: only what is set goes on the wire."""
        options: dict[str, object] = {}
        if self.from_:
            options["from_"] = self.from_
        for name in ("messaging_service_sid", "validity_period", "smart_encoded", "shorten_urls"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options


@dataclass(frozen=True)
class Refused:
    """Twilio (or the network) refused the message: the HTTP status and Twilio code, when there are any."""

    http_status: int | None
    code: int | None
    message: str


def get_client(account_sid: str, auth_token: str, base_url: str) -> Client:
    """This thread's client for one Twilio account, made on first use."""
    clients: dict[tuple[str, str, str, float, float], Client] = _local.__dict__.setdefault("clients", {})
    key = (account_sid, auth_token, base_url, CONNECT_TIMEOUT, READ_TIMEOUT)
    client = clients.get(key)
    if client is None:
        http_client = TwilioHttpClient(timeout=READ_TIMEOUT)
        # requests takes (connect, read); twilio-python's constructor only checks a single number.
        http_client.timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)  # type: ignore[assignment]
        assert http_client.session is not None  # it pools connections by default
        read_environment_once(http_client.session, base_url)
        client = Client(account_sid, auth_token, http_client=http_client)
        # Tests and Twilio-compatible providers use another host than api.twilio.com.
        client.api.base_url = base_url
        clients[key] = client
    return client


def client_for(bot: Bot, settings: Settings) -> Client:
    """The bot's client, made before a send is timed: the first one in a process takes tens of ms."""
    return get_client(bot.account_sid, bot.auth_token, settings.twilio_api_base_url)


def send_sms(client: Client, sender: Sender | str, to: str, body: str, media_url: str | None,
             public_url: str | None, reply_id: str | None = None) -> Accepted | Refused:
    """POST one message from `sender` (a Sender, or a bare number); never raises for Twilio's or the
    network's refusals. The status callback names the reply (`?reply=`), so a callback can settle a
    send whose answer was lost."""
    sender = Sender(sender) if isinstance(sender, str) else sender
    options: dict[str, object] = {"to": to, **sender.options()}
    if body:
        options["body"] = body
    if media_url:
        options["media_url"] = [media_url]
    if public_url:
        options["status_callback"] = public_url + STATUS_CALLBACK_PATH + (f"?reply={quote(reply_id)}" if reply_id else "")
    try:
        message = client.messages.create(**options)  # type: ignore[arg-type]
    except TwilioRestException as error:
        return Refused(error.status, error.code, error.msg)
    except OSError as error:
        # requests' ConnectionError and Timeout are OSErrors: the message may or may not exist.
        return Refused(None, None, f"{error.__class__.__name__}: {error}")
    return Accepted(sid=str(message.sid), status=str(message.status or "queued"))


def outcome_unknown(refused: Refused) -> bool:
    """Whether the message may exist at Twilio all the same: no answer reached us (a timeout, a
    reset after the request was written), or a 5xx that is not Twilio's own error document (a
    proxy's). Twilio's own refusals, 5xx included, say it was not created."""
    return refused.http_status is None or (refused.http_status >= 500 and refused.code is None)


def find_sent(client: Client, from_: str | None, to: str, body: str, since: float,
              exclude: Callable[[list[str]], set[str]]) -> str | None:
    """The SID of a message with `body` that Twilio accepted from `from_` (any sender when None:
    a messaging service picked it) to `to` since `since`
    (Unix time, give or take CLOCK_MARGIN_SECONDS), if there is one: the account's message list,
    newest first, read until messages older than that. `exclude` names, of the candidates, those
    known to be other replies (the same text sent twice). Raises TwilioRestException or OSError
    when Twilio cannot be asked."""
    candidates: list[str] = []
    filters: dict[str, str] = {"from_": from_} if from_ else {}
    for message in client.messages.stream(to=to, page_size=LIST_PAGE_SIZE, **filters):  # type: ignore[arg-type]
        created = message.date_created
        if created is not None and created.timestamp() < since - CLOCK_MARGIN_SECONDS:
            break
        if (message.body or "") == body:
            candidates.append(str(message.sid))
    others = exclude(candidates) if candidates else set()
    # Newest first: the oldest match is the one this attempt made, later ones another reply's.
    return next((sid for sid in reversed(candidates) if sid not in others), None)
