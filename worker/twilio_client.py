"""Twilio's REST API through twilio-python: one client per (account, token) per thread, reused.

A client holds a requests Session, so reusing it keeps connections to Twilio alive between sends;
one per thread because a Session is not documented as thread-safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

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

_local = threading.local()


@dataclass(frozen=True)
class Accepted:
    """Twilio took the message: its SID and the status it answered with."""

    sid: str
    status: str


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


def send_sms(client: Client, from_: str, to: str, body: str, media_url: str | None,
             public_url: str | None) -> Accepted | Refused:
    """POST one message; never raises for Twilio's or the network's refusals."""
    options: dict[str, object] = {"to": to, "from_": from_}
    if body:
        options["body"] = body
    if media_url:
        options["media_url"] = [media_url]
    if public_url:
        options["status_callback"] = public_url + STATUS_CALLBACK_PATH
    try:
        message = client.messages.create(**options)  # type: ignore[arg-type]
    except TwilioRestException as error:
        return Refused(error.status, error.code, error.msg)
    except OSError as error:
        # requests' ConnectionError and Timeout are OSErrors: the message may or may not exist.
        return Refused(None, None, f"{error.__class__.__name__}: {error}")
    return Accepted(sid=str(message.sid), status=str(message.status or "queued"))
