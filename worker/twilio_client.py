"""Twilio's REST API through twilio-python: one client per (account, token) per process, reused.

twilio-python builds each request and reads each answer; the HTTP goes through `Transport`, a
twilio-python HttpClient on the process's connection pool to Twilio (worker.http.Origin), which
keeps connections alive between sends and is shared by every thread and every account.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from twilio.base.exceptions import TwilioRestException
from twilio.http import HttpClient
from twilio.http.response import Response
from twilio.rest import Client

from shared.bots import Bot
from shared.settings import Settings
from worker.http import origin

# Dramatiq's TimeLimit cannot interrupt a blocked socket, so every call carries its own limits.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0
STATUS_CALLBACK_PATH = "/channels/sms/status"
# Twilio's date_created has second precision, and our clocks may differ from Twilio's a little.
CLOCK_MARGIN_SECONDS = 5.0
LIST_PAGE_SIZE = 50

_clients: dict[tuple[str, str, str], Client] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class Accepted:
    """Twilio took the message: its SID and the status it answered with."""

    sid: str
    status: str
    from_: str | None = None  # the number it goes from; None while a Messaging Service has yet to pick one


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


class Transport(HttpClient):
    """twilio-python's requests, sent on the process's pooled connections to their origin. Never
    retried or redirected; a network failure raises an OSError (a TimeoutError for a timeout), as
    twilio-python's own client lets requests' errors through."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("twilio.http_client"), is_async=False, timeout=READ_TIMEOUT)

    def request(self, method: str, url: str, params: dict[str, object] | None = None,
                data: dict[str, object] | None = None, headers: dict[str, str] | None = None,
                auth: tuple[str, str] | None = None, timeout: float | None = None,
                allow_redirects: bool = False) -> Response:
        headers = dict(headers or {})
        if auth is not None:
            headers["Authorization"] = urllib3.make_headers(basic_auth=f"{auth[0]}:{auth[1]}")["authorization"]
        if params:
            url += ("&" if "?" in url else "?") + _form(params)
        body = None
        if data:
            json_body = headers.get("Content-Type") in ("application/json", "application/scim+json")
            body = (json.dumps(data) if json_body else _form(data)).encode()
        # The module's limits, read on each call, so they can be tuned in one place.
        limits = urllib3.Timeout(connect=CONNECT_TIMEOUT, read=timeout or READ_TIMEOUT)
        try:
            answer = origin(url).request(method.upper(), url, body, headers, limits)
        except urllib3.exceptions.TimeoutError as error:
            raise TimeoutError(f"Twilio did not answer in time: {error}") from error
        except urllib3.exceptions.HTTPError as error:
            raise ConnectionError(f"Twilio could not be reached: {error}") from error
        return Response(answer.status, answer.data.decode("utf-8", "replace"), answer.headers)


def _form(values: dict[str, object]) -> str:
    """Form or query encoding as requests does it: a list is the field repeated, None leaves it out."""
    pairs: list[tuple[str, Any]] = []
    for name, value in values.items():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if item is not None:
                pairs.append((name, item))
    return urlencode(pairs)


_TRANSPORT = Transport()


def get_client(account_sid: str, auth_token: str, base_url: str) -> Client:
    """The process's client for one Twilio account, made on first use."""
    key = (account_sid, auth_token, base_url)
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = Client(account_sid, auth_token, http_client=_TRANSPORT)
                # Tests and Twilio-compatible providers use another host than api.twilio.com.
                client.api.base_url = base_url
                _clients[key] = client
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
    return Accepted(sid=str(message.sid), status=str(message.status or "queued"),
                    from_=str(message.from_) if message.from_ else None)


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
