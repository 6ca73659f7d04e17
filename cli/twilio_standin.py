"""A local stand-in for Twilio's Messages REST API, served over real HTTP.

Two users need it:

* ``mammut-sms dev`` prints every outbound SMS to the console, so an operator can talk to a
  bot without a phone or a Twilio account.
* The tests and benchmarks inject failures (429s, opted-out recipients, slow answers) and read
  exact arrival times.

It speaks Twilio's wire protocol (form-encoded POSTs, HTTP Basic auth, Twilio's JSON bodies and
error envelope), so the product's unmodified twilio-python ``Client`` works against it once
``client.api.base_url`` is set to :attr:`TwilioStandin.url`.

Other processes (benchmarks, end-to-end tests) program it over HTTP, without credentials:

* ``GET /_standin/messages`` and ``GET /_standin/attempts``: JSON lists of :class:`SentMessage`
  and :class:`Attempt` as ``dataclasses.asdict`` renders them (so the sender is ``"from_"``).
* ``POST /_standin/fail`` with JSON ``{count, status, code, message, to}`` is :meth:`fail_next`;
  add ``"always": true`` (and ``to``) for :meth:`fail_always`.
* ``POST /_standin/delay`` with JSON ``{seconds, count}`` is :meth:`fail_with_delay`.
* ``POST /_standin/accept_then_drop`` with JSON ``{count, to}`` is :meth:`accept_then_drop`: the
  send is accepted (stored, listed, its callbacks run) but the connection closes with no answer.
* ``POST /_standin/accept_then_delay`` with JSON ``{seconds, count, to}`` is
  :meth:`accept_then_delay`: the send is accepted but answered only ``seconds`` later.
* ``POST /_standin/services`` with JSON ``{sid, numbers}`` is :meth:`set_service`.
* ``POST /_standin/queue_overflow`` with JSON ``{service, on}`` is :meth:`queue_overflow`.
* ``POST /_standin/fail_after_accept`` with JSON ``{to, code}`` is :meth:`fail_after_accept`.
* ``POST /_standin/reset`` is :meth:`reset`.

Those last two model lost answers: Twilio took the SMS but the client never learns it, so only
listing ``GET .../Messages.json`` (``From``, ``To``, ``DateSent``/``DateSent<``/``DateSent>``,
``PageSize``, ``Page``/``PageToken``; newest first, paged through ``next_page_uri``) tells.

Messaging Services: a send with ``MessagingServiceSid`` (``services=`` or :meth:`set_service` give
each service its pool of numbers) is answered ``accepted`` with ``from`` null and ``num_segments``
0, as Twilio answers before it picks a sender. The stand-in picks one at once, sticky per
recipient, so fetch, list and the callbacks (``queued``, ``sent``, ``delivered``) show it.

Run it alone with ``python -m cli.twilio_standin --port 8765 [--quiet] [--service MG...:+1...,+1...]``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import functools
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import requests
from twilio.request_validator import RequestValidator

from shared.segments import count_segments

__all__ = ["Attempt", "SentMessage", "TwilioStandin", "main"]

_log = logging.getLogger(__name__)

API_VERSION = "2010-04-01"
MAX_BODY_CHARS = 1600  # Twilio rejects longer bodies with 21617
_MAX_REQUEST_BYTES = 1 << 20  # a real send is a few KB; this only stops a runaway client
_IDLE_TIMEOUT = 30.0  # seconds an idle keep-alive connection may hold its handler thread
_CALLBACK_TIMEOUT = 5.0  # Twilio gives status callback receivers a similar budget
_CALLBACK_WORKERS = 4
DEFAULT_PAGE_SIZE = 50  # Twilio's default PageSize for lists
MAX_PAGE_SIZE = 1000  # and its maximum; larger requests get this many

_MESSAGES_PATH = re.compile(rf"/{API_VERSION}/Accounts/(?P<account>[^/]+)/Messages\.json")
_MESSAGE_PATH = re.compile(rf"/{API_VERSION}/Accounts/(?P<account>[^/]+)/Messages/(?P<sid>[^/]+)\.json")
_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")

# Twilio's own wording for the codes tests inject most, so logs read like production ones.
_DEFAULT_MESSAGES: dict[int, str] = {
    20003: "Authenticate",
    20429: "Too Many Requests",
    21211: "Invalid 'To' Phone Number",
    21610: "Attempt to send to unsubscribed recipient",
    21611: "This 'From' number has exceeded the maximum number of queued messages",
    21614: "'To' number is not a valid mobile number",
    21701: "The Messaging Service does not exist",
    21705: "The Messaging Service is invalid",
    21711: "Phone Number, Shortcode, or AlphaSender is not associated to the specified Messaging Service",
    30001: "Queue overflow",
    30003: "Unreachable destination handset",
    30124: "MessagingServiceSID cannot be empty or null",
}

@dataclass
class SentMessage:
    """One message the stand-in accepted, as the tests read it."""

    sid: str
    account_sid: str
    to: str
    from_: str | None  # the sender: with a MessagingServiceSid and no From, the one picked from the pool
    body: str
    media_urls: list[str]
    status_callback: str | None
    received_at: float  # time.time() when the request was processed
    form: dict[str, list[str]]  # every posted field, repeated ones kept in order
    messaging_service_sid: str | None = None
    status: str = "queued"  # advanced by the status-callback lifecycle
    error_code: int | None = None
    sent_at: float | None = None  # when the lifecycle marked it "sent" (Twilio's date_sent)
    validity_period: int | None = None  # ValidityPeriod, SmartEncoded, ShortenUrls as posted; None: absent
    smart_encoded: bool | None = None
    shorten_urls: bool | None = None


@dataclass(frozen=True)
class Attempt:
    """One POST to Messages.json, accepted or not."""

    received_at: float
    to: str | None
    from_: str | None
    body: str | None
    http_status: int
    code: int | None  # Twilio error code; None when accepted
    lost: str | None = None  # "drop" or "late" when accept_then_drop/accept_then_delay withheld the answer
    messaging_service_sid: str | None = None


@dataclass(frozen=True)
class _Reply:
    status: int
    payload: Any  # JSON-serialisable
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to hold the answer back (fail_with_delay, accept_then_delay)
    lost: str | None = None  # "drop": close without answering; "late": never answer once stop() began


@dataclass
class _FailRule:
    remaining: int
    error: _Reply
    to: str | None


@dataclass
class _LostRule:
    """accept_then_drop / accept_then_delay: consumed only by sends that are accepted."""

    remaining: int
    mode: str  # "drop" or "late"
    seconds: float
    to: str | None


@dataclass(frozen=True)
class _Fields:
    """The form fields the stand-in acts on; blank values count as missing, as at Twilio."""

    to: str | None
    from_: str | None
    body: str | None
    media_urls: list[str]
    messaging_service_sid: str | None
    status_callback: str | None
    content_sid: str | None
    validity_period: int | None
    smart_encoded: bool | None
    shorten_urls: bool | None

    @classmethod
    def parse(cls, form: Mapping[str, list[str]]) -> _Fields:
        def first(name: str) -> str | None:
            values = form.get(name)
            return values[0] if values and values[0] != "" else None

        def flag(name: str) -> bool | None:
            value = first(name)
            return None if value is None else value.lower() == "true"

        from_, service = first("From"), first("MessagingServiceSid")
        if service is None and from_ is not None and _SERVICE_SID.fullmatch(from_):
            from_, service = None, from_  # Twilio takes a Messaging Service SID in From too
        validity = first("ValidityPeriod")
        return cls(
            to=first("To"),
            from_=from_,
            body=first("Body"),
            media_urls=[url for url in form.get("MediaUrl", []) if url],
            messaging_service_sid=service,
            status_callback=first("StatusCallback"),
            content_sid=first("ContentSid"),
            validity_period=int(validity) if validity is not None and validity.isdigit() else None,
            smart_encoded=flag("SmartEncoded"),
            shorten_urls=flag("ShortenUrls"),
        )


def _error(status: int, code: int, message: str | None = None) -> _Reply:
    """Twilio's legacy error envelope, which twilio-python turns into TwilioRestException."""
    payload = {
        "code": code,
        "message": message or _DEFAULT_MESSAGES.get(code, "Error"),
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else {}
    return _Reply(status, payload, headers)


def _validation_error(fields: _Fields) -> _Reply | None:
    if fields.to is None:
        return _error(400, 21604, "A 'To' phone number is required.")
    if fields.from_ is None and fields.messaging_service_sid is None:
        return _error(400, 21603, "A 'From' phone number is required.")
    if fields.body is None and not fields.media_urls and fields.content_sid is None:
        return _error(400, 21602, "Message body is required.")
    if fields.body is not None and len(fields.body) > MAX_BODY_CHARS:
        return _error(400, 21617, "The concatenated message body exceeds the 1600 character limit.")
    if fields.shorten_urls and fields.messaging_service_sid is None:
        # Twilio's docs: ShortenUrls=true needs a MessagingServiceSid; 30124 is the code for a missing one.
        return _error(400, 30124)
    return None


class _BadQuery(ValueError):
    """A list query Twilio would refuse with 400/20001."""


def _filter_day(name: str, value: str) -> date:
    """A DateSent filter's day: ``YYYY-MM-DD``, or an ISO 8601 date-time (what twilio-python
    sends for a ``datetime``) whose time of day is ignored, as Twilio filters by day only."""
    try:
        day = date.fromisoformat(value[:10])
        if len(value) > 10 and (value[10] != "T" or not datetime.fromisoformat(value)):
            raise ValueError(value)
    except ValueError:
        raise _BadQuery(f"Invalid date value for {name}: {value!r}") from None
    return day


@dataclass(frozen=True)
class _ListQuery:
    """GET Messages.json's query: Twilio's filters, page size and page position."""

    filters: list[tuple[str, str]]  # the filters given, in Twilio's order, echoed in page URIs
    to: str | None
    from_: str | None
    sent_on: date | None
    sent_on_or_before: date | None
    sent_on_or_after: date | None
    page_size: int
    page: int
    page_token: str | None

    @classmethod
    def parse(cls, query: str) -> _ListQuery:
        params = {name: values[0] for name, values in parse_qs(query, keep_blank_values=True).items()}
        # Blank values count as missing, as for the create form.
        names = ("To", "From", "DateSent", "DateSent<", "DateSent>")
        filters = [(name, params[name]) for name in names if params.get(name)]
        given = dict(filters)
        days = {name: _filter_day(name, value) for name, value in given.items() if name.startswith("DateSent")}
        try:
            page_size = int(params.get("PageSize") or DEFAULT_PAGE_SIZE)
            page = int(params.get("Page") or 0)
        except ValueError:
            raise _BadQuery("PageSize and Page must be integers") from None
        if page_size < 1 or page < 0:
            raise _BadQuery("PageSize must be at least 1 and Page at least 0")
        token = params.get("PageToken") or None
        if token is not None and (token[:2] not in ("PA", "PB") or not token[2:]):
            raise _BadQuery(f"Invalid PageToken: {token!r}")
        return cls(
            filters=filters,
            to=given.get("To"),
            from_=given.get("From"),
            sent_on=days.get("DateSent"),
            sent_on_or_before=days.get("DateSent<"),
            sent_on_or_after=days.get("DateSent>"),
            page_size=min(page_size, MAX_PAGE_SIZE),
            page=page,
            page_token=token,
        )

    def matches(self, message: SentMessage) -> bool:
        if self.to is not None and message.to != self.to:
            return False
        if self.from_ is not None and message.from_ != self.from_:
            return False
        if self.sent_on is None and self.sent_on_or_before is None and self.sent_on_or_after is None:
            return True
        if message.sent_at is None:  # date_sent is empty until sent: no date filter matches it
            return False
        day = datetime.fromtimestamp(message.sent_at, timezone.utc).date()
        return (
            (self.sent_on is None or day == self.sent_on)
            and (self.sent_on_or_before is None or day <= self.sent_on_or_before)
            and (self.sent_on_or_after is None or day >= self.sent_on_or_after)
        )

    def uri(self, path: str, page: int, token: str | None) -> str:
        """A page's URI as Twilio writes it: the filters, PageSize, Page and PageToken."""
        params: list[tuple[str, Any]] = [*self.filters, ("PageSize", self.page_size), ("Page", page)]
        if token is not None:
            params.append(("PageToken", token))
        return f"{path}?{urlencode(params)}"


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(header[len("Basic ") :], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def _rfc2822(timestamp: float) -> str:
    # Twilio writes "+0000" rather than "GMT"; twilio-python parses either.
    return format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))


def _resource(message: SentMessage) -> dict[str, Any]:
    """The message as Twilio's API renders it."""
    uri = f"/{API_VERSION}/Accounts/{message.account_sid}/Messages/{message.sid}.json"
    created = _rfc2822(message.received_at)
    sent = None if message.sent_at is None else _rfc2822(message.sent_at)
    return {
        "account_sid": message.account_sid,
        "api_version": API_VERSION,
        "body": message.body,
        "date_created": created,
        "date_sent": sent,
        "date_updated": sent or created,
        "direction": "outbound-api",
        "error_code": message.error_code,
        "error_message": None,
        "from": message.from_,
        "messaging_service_sid": message.messaging_service_sid,
        "num_media": str(len(message.media_urls)),
        "num_segments": str(count_segments(message.body)),
        "price": None,
        "price_unit": "USD",
        "sid": message.sid,
        "status": message.status,
        "subresource_uris": {"media": uri.removesuffix(".json") + "/Media.json"},
        "to": message.to,
        "uri": uri,
    }


def _answer(message: SentMessage, fields: _Fields) -> dict[str, Any]:
    """Create's answer. Through a Messaging Service Twilio answers before it picks a sender: "accepted",
    no segments counted and, unless From was given, "from" null (twilio-python's ``from_`` is None)."""
    resource = _resource(message)
    if message.messaging_service_sid is not None:
        resource.update({"status": "accepted", "num_segments": "0", "from": fields.from_})
    return resource


def _callback_params(message: SentMessage, status: str, error_code: int | None) -> dict[str, str]:
    params = {
        "AccountSid": message.account_sid,
        "ApiVersion": API_VERSION,
        "MessageSid": message.sid,
        "MessageStatus": status,
        "SmsSid": message.sid,  # Twilio still sends the legacy Sms* names alongside
        "SmsStatus": status,
        "To": message.to,
    }
    if message.from_ is not None:
        params["From"] = message.from_
    if message.messaging_service_sid is not None:
        params["MessagingServiceSid"] = message.messaging_service_sid
    if error_code is not None:
        params["ErrorCode"] = str(error_code)
    return params


def _echo_line(message: SentMessage) -> str:
    via = f" via {message.messaging_service_sid}" if message.messaging_service_sid else ""
    line = f"SMS {message.from_} -> {message.to}{via}: {message.body}".replace("\r", "").replace("\n", "\\n")
    if message.media_urls:
        line += f" [media: {', '.join(message.media_urls)}]"
    return line


class TwilioStandin:
    """Twilio's Messages API on a local port, recording and optionally failing every send."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        accounts: dict[str, str] | None = None,
        echo: Callable[[str], None] | None = None,
        status_callbacks: bool = False,
        clock: Callable[[], float] = time.time,
        services: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._accounts = dict(accounts) if accounts is not None else None  # None: any credentials
        self._echo = echo
        self._status_callbacks = status_callbacks
        self._clock = clock  # received_at and sent_at; tests pass a fake one to place sends on given days
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # wakes wait_for on every POST
        self._stopped = threading.Event()  # also cuts injected delays short on stop()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._callbacks: ThreadPoolExecutor | None = None
        self._url: str | None = None
        self._services: dict[str, tuple[str, ...]] = {}  # Messaging Service SID -> its pool; kept by reset()
        for sid, numbers in (services or {}).items():
            self.set_service(sid, numbers)
        self._clear()

    def _clear(self) -> None:
        self._messages: list[SentMessage] = []
        self._by_sid: dict[str, SentMessage] = {}
        self._attempts: list[Attempt] = []
        self._fail_rules: list[_FailRule] = []
        self._fail_always: dict[str, _Reply] = {}
        self._undeliverable: dict[str, int] = {}
        self._delays: collections.deque[float] = collections.deque()
        self._lost_rules: list[_LostRule] = []
        self._sticky: dict[tuple[str, str], str] = {}  # (service, To) -> the sender it was given
        self._assigned: collections.Counter[str] = collections.Counter()  # senders handed out per service
        self._overflowing: set[str] = set()
        self._late_failures: dict[str, int] = {}
        self._create_seconds = 0.0
        self._open: collections.Counter[str] = collections.Counter()  # creates being answered, per account
        self._most_open: collections.Counter[str] = collections.Counter()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL to put in ``client.api.base_url``, e.g. ``http://127.0.0.1:8765``."""
        if self._url is None:
            raise RuntimeError("TwilioStandin is not started")
        return self._url

    def start(self) -> TwilioStandin:
        if self._server is not None:
            raise RuntimeError("TwilioStandin is already started")
        self._stopped.clear()
        self._server = _Server((self._host, self._port), self)
        port = self._server.server_address[1]
        # A wildcard bind is reachable via loopback; clients cannot connect to "0.0.0.0" everywhere.
        connect_host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        self._url = f"http://{connect_host}:{port}"
        if self._status_callbacks:
            self._callbacks = ThreadPoolExecutor(_CALLBACK_WORKERS, thread_name_prefix="twilio-standin-callback")
        # A short poll interval keeps stop() fast: shutdown() waits for the serve loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="twilio-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopped.set()
        server.shutdown()  # stop accepting first, so no connection escapes close_connections()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
        if self._callbacks is not None:
            self._callbacks.shutdown(wait=True, cancel_futures=True)
            self._callbacks = None

    def __enter__(self) -> TwilioStandin:
        # `with TwilioStandin().start() as s:` is a natural spelling too; don't start twice.
        return self if self._server is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what tests read ---------------------------------------------------------------------

    @property
    def messages(self) -> list[SentMessage]:
        """Accepted messages in arrival order (a snapshot)."""
        with self._lock:
            return list(self._messages)

    @property
    def attempts(self) -> list[Attempt]:
        """Every POST to Messages.json, rejected ones included, in arrival order (a snapshot)."""
        with self._lock:
            return list(self._attempts)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[SentMessage]:
        """Block until at least ``count`` messages were accepted; AssertionError otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._messages) >= count, timeout):
                raise AssertionError(
                    f"expected at least {count} accepted message(s) within {timeout}s, "
                    f"but {len(self._messages)} arrived ({len(self._attempts)} POST attempt(s))"
                )
            return list(self._messages)

    # -- failure injection -------------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 429,
        code: int = 20429,
        message: str | None = None,
        to: str | None = None,
    ) -> None:
        """The next ``count`` POSTs (only those to ``to``, if given) get this error instead."""
        with self._lock:
            self._fail_rules.append(_FailRule(count, _error(status, code, message), to))

    def fail_always(self, *, to: str, status: int = 400, code: int = 21211, message: str | None = None) -> None:
        """Every POST to ``to`` fails until reset(), e.g. 21610 (opted out) or 21211 (invalid To)."""
        with self._lock:
            self._fail_always[to] = _error(status, code, message)

    def fail_with_delay(self, seconds: float, count: int = 1) -> None:
        """The next ``count`` POSTs are processed at once but answered ``seconds`` later.

        Recording before the pause mirrors Twilio: a client that times out has still sent the
        SMS, which is exactly the duplicate-send hazard a retry policy must face.
        """
        with self._lock:
            self._delays.extend([seconds] * count)

    def accept_then_drop(self, count: int = 1, *, to: str | None = None) -> None:
        """The next ``count`` accepted sends (only those to ``to``, if given) get no answer at all.

        Each such send is accepted as usual (stored, listed, counted in :attr:`messages`, echoed,
        its status callbacks run), then the connection is closed without an HTTP response, so
        the client sees the server hang up (requests' ``ConnectionError`` wrapping
        ``RemoteDisconnected``). Rejected sends (auth, injected errors, validation) answer as
        usual and do not use up the count.
        """
        self._add_lost_rule(_LostRule(count, "drop", 0.0, to))

    def accept_then_delay(self, seconds: float, count: int = 1, *, to: str | None = None) -> None:
        """The next ``count`` accepted sends (only those to ``to``, if given) are answered ``seconds`` late.

        Like :meth:`fail_with_delay`, but only accepted sends use up the count and ``to`` can
        narrow it. Pick ``seconds`` above the client's read timeout so it times out. If stop()
        comes first the answer is never written: the connection just closes.
        """
        self._add_lost_rule(_LostRule(count, "late", float(seconds), to))

    def _add_lost_rule(self, rule: _LostRule) -> None:
        if rule.remaining < 1 or not rule.seconds >= 0:
            raise ValueError(f"count must be at least 1 and seconds at least 0, not {rule.remaining}, {rule.seconds}")
        with self._lock:
            self._lost_rules.append(rule)

    def fail_delivery(self, *, to: str, code: int = 30003) -> None:
        """Accept sends to ``to``, then call back "undelivered" with ``ErrorCode`` (needs status_callbacks)."""
        with self._lock:
            self._undeliverable[to] = code

    def set_service(self, sid: str, numbers: Sequence[str]) -> None:
        """Create or replace Messaging Service ``sid`` with this pool of sender numbers.

        A recipient keeps its sender while that sender stays in the pool; reset() forgets who had which.
        """
        if not _SERVICE_SID.fullmatch(sid) or not numbers or len(set(numbers)) != len(numbers):
            raise ValueError(f"a service needs an MG + 32 hex SID and distinct numbers, not {sid!r}: {numbers!r}")
        with self._lock:
            self._services[sid] = tuple(numbers)

    def queue_overflow(self, service: str, on: bool = True) -> None:
        """Sends through ``service`` are accepted, then fail with 30001 in a callback (needs status_callbacks).

        With a Messaging Service, Twilio reports a full sender queue this way instead of 21611.
        """
        with self._lock:
            if on:
                self._overflowing.add(service)
            else:
                self._overflowing.discard(service)

    def fail_after_accept(self, *, to: str, code: int = 21610) -> None:
        """Accept sends to ``to``, then call back "failed" with ``ErrorCode`` (needs status_callbacks).

        The default is an opted-out recipient as a Messaging Service send learns of it: late, not as a 400.
        """
        with self._lock:
            self._late_failures[to] = code

    def take_time(self, seconds: float) -> None:
        """Answer every create `seconds` after it arrives (until reset()), as a busy Twilio would."""
        with self._lock:
            self._create_seconds = seconds

    def most_open(self, account_sid: str) -> int:
        """The most creates of the account the stand-in was answering at once (since reset())."""
        with self._lock:
            return self._most_open[account_sid]

    def _opened(self, account_sid: str, change: int) -> None:
        with self._lock:
            self._open[account_sid] += change
            self._most_open[account_sid] = max(self._most_open[account_sid], self._open[account_sid])

    def reset(self) -> None:
        """Forget recorded messages, attempts, sticky senders and every injected failure (not the services)."""
        with self._lock:
            self._clear()

    # -- request handling (called from server threads) ---------------------------------------

    def _handle(self, method: str, target: str, authorization: str | None, body: bytes) -> _Reply:
        path, query = urlsplit(target)[2:4]
        try:
            if path.startswith("/_standin/"):
                return self._control(method, path, body)
            return self._api(method, path, query, _basic_auth(authorization), body)
        except Exception:  # a stand-in bug must reach the client as Twilio's 500, not a hang-up
            _log.exception("twilio stand-in failed on %s %s", method, path)
            return _error(500, 20500, "Internal Server Error")

    def _api(
        self, method: str, path: str, query: str, credentials: tuple[str, str] | None, body: bytes
    ) -> _Reply:
        if match := _MESSAGES_PATH.fullmatch(path):
            if method == "GET":
                return self._list(match["account"], credentials, query)
            if method != "POST":
                return _error(405, 20004, "Method not allowed")
            form = parse_qs(body.decode("ascii", "replace"), keep_blank_values=True, encoding="utf-8")
            return self._create(match["account"], credentials, form)
        if match := _MESSAGE_PATH.fullmatch(path):
            if method != "GET":
                return _error(405, 20004, "Method not allowed")
            return self._fetch(match["account"], match["sid"], credentials)
        return _error(404, 20404, f"The requested resource {path} was not found")

    def _auth_error(self, account_sid: str, credentials: tuple[str, str] | None) -> _Reply | None:
        if credentials is None or credentials[0] != account_sid:
            return _error(401, 20003)
        if self._accounts is not None and self._accounts.get(account_sid) != credentials[1]:
            return _error(401, 20003)
        return None

    def _injected_error(self, to: str | None) -> _Reply | None:
        for rule in self._fail_rules:
            if rule.to is None or rule.to == to:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._fail_rules.remove(rule)
                return rule.error
        return self._fail_always.get(to) if to is not None else None

    def _create(self, account_sid: str, credentials: tuple[str, str] | None, form: dict[str, list[str]]) -> _Reply:
        fields = _Fields.parse(form)
        message: SentMessage | None = None
        steps: list[tuple[str, int | None]] = []
        with self._changed:
            now = self._clock()
            delay = self._delays.popleft() if self._delays else self._create_seconds
            # Auth first, then injected faults (a 429 comes before Twilio looks at the payload).
            error = self._auth_error(account_sid, credentials) or self._injected_error(fields.to)
            error = error or _validation_error(fields) or self._service_error(fields)
            if error is None:
                message = self._accept(account_sid, fields, form, now)
                reply = _Reply(201, _answer(message, fields), delay=delay)
                if (rule := self._lost_rule(fields.to)) is not None:
                    reply = replace(reply, delay=max(delay, rule.seconds), lost=rule.mode)
                steps = self._lifecycle(message)
            else:
                reply = replace(error, delay=delay)
            code = None if error is None else error.payload["code"]
            attempt = Attempt(
                now, fields.to, fields.from_, fields.body, reply.status, code, reply.lost, fields.messaging_service_sid
            )
            self._attempts.append(attempt)
            self._changed.notify_all()
        if message is not None and credentials is not None:
            self._announce(message, credentials[1], steps)
        return reply

    def _service_error(self, fields: _Fields) -> _Reply | None:
        service = fields.messaging_service_sid
        if service is None:
            return None
        if not _SERVICE_SID.fullmatch(service):
            return _error(400, 21705)
        if service not in self._services:
            return _error(400, 21701)
        if fields.from_ is not None and fields.from_ not in self._services[service]:
            return _error(400, 21711)
        return None

    def _sender(self, service: str, to: str) -> str:
        """Sticky Sender: the recipient's sender while it is in the pool, else the pool's next in turn."""
        pool = self._services[service]
        sender = self._sticky.get((service, to))
        if sender not in pool:
            sender = pool[self._assigned[service] % len(pool)]
            self._assigned[service] += 1
            self._sticky[(service, to)] = sender
        return sender

    def _lifecycle(self, message: SentMessage) -> list[tuple[str, int | None]]:
        """The statuses the callbacks will report, in order, each with its ErrorCode."""
        overflowing = message.messaging_service_sid in self._overflowing
        late_code = 30001 if overflowing else self._late_failures.get(message.to)
        if late_code is not None:
            steps: list[tuple[str, int | None]] = [("failed", late_code)]
        elif (undelivered_code := self._undeliverable.get(message.to)) is not None:
            steps = [("sent", None), ("undelivered", undelivered_code)]
        else:
            steps = [("sent", None), ("delivered", None)]
        # A service's message is "accepted" until a sender is picked; "queued" is then called back too.
        return steps if message.messaging_service_sid is None else [("queued", None), *steps]

    def _lost_rule(self, to: str | None) -> _LostRule | None:
        for rule in self._lost_rules:
            if rule.to is None or rule.to == to:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._lost_rules.remove(rule)
                return rule
        return None

    def _accept(self, account_sid: str, fields: _Fields, form: dict[str, list[str]], now: float) -> SentMessage:
        assert fields.to is not None  # _validation_error guarantees it
        service = fields.messaging_service_sid
        message = SentMessage(
            sid="SM" + uuid.uuid4().hex,
            account_sid=account_sid,
            to=fields.to,
            from_=fields.from_ if fields.from_ is not None or service is None else self._sender(service, fields.to),
            body=fields.body or "",
            media_urls=fields.media_urls,
            status_callback=fields.status_callback,
            received_at=now,
            form=form,
            messaging_service_sid=service,
            validity_period=fields.validity_period,
            smart_encoded=fields.smart_encoded,
            shorten_urls=fields.shorten_urls,
        )
        self._messages.append(message)
        self._by_sid[message.sid] = message
        return message

    def _announce(self, message: SentMessage, auth_token: str, steps: list[tuple[str, int | None]]) -> None:
        if self._echo is not None:
            try:
                self._echo(_echo_line(message))
            except Exception:  # a broken console must not turn an accepted send into a 500
                _log.exception("twilio stand-in echo failed")
        if self._callbacks is not None and message.status_callback is not None:
            try:
                self._callbacks.submit(self._run_lifecycle, message, auth_token, steps)
            except RuntimeError:  # executor already shut down: stop() is under way
                pass

    def _fetch(self, account_sid: str, sid: str, credentials: tuple[str, str] | None) -> _Reply:
        error = self._auth_error(account_sid, credentials)
        if error is not None:
            return error
        with self._lock:
            message = self._by_sid.get(sid)
            if message is None or message.account_sid != account_sid:
                path = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}.json"
                return _error(404, 20404, f"The requested resource {path} was not found")
            return _Reply(200, _resource(message))

    def _list_auth_error(self, account_sid: str, credentials: tuple[str, str] | None) -> _Reply | None:
        """401 for missing or wrong credentials; 404 when good credentials name another account's path."""
        if credentials is None:
            return _error(401, 20003)
        user, token = credentials
        if self._accounts is not None and self._accounts.get(user) != token:
            return _error(401, 20003)
        if user != account_sid:
            path = f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"
            return _error(404, 20404, f"The requested resource {path} was not found")
        return None

    def _list(self, account_sid: str, credentials: tuple[str, str] | None, query: str) -> _Reply:
        """Twilio's Messages list: the account's messages matching the filters, newest first, paged."""
        error = self._list_auth_error(account_sid, credentials)
        if error is not None:
            return error
        try:
            request = _ListQuery.parse(query)
        except _BadQuery as exc:
            return _error(400, 20001, str(exc))
        path = f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"
        size = request.page_size
        with self._lock:
            # Newest first by date_created; arrival order breaks ties (and orders equal fake clocks).
            keyed = [((m.received_at, i), m) for i, m in enumerate(self._messages) if m.account_sid == account_sid]
            matching = sorted(((k, m) for k, m in keyed if request.matches(m)), key=lambda e: e[0], reverse=True)
            if request.page_token is None:
                start = request.page * size
                page = matching[start : start + size]
            else:
                # Twilio's tokens name the record a page continues from: PA<sid> (after it, i.e.
                # older) or PB<sid> (before it). Anchoring on a record, not an offset, keeps paging
                # exact while new messages arrive on top.
                anchor = next((k for k, m in keyed if m.sid == request.page_token[2:]), None)
                if anchor is None:
                    return _error(400, 20001, f"Invalid PageToken: {request.page_token!r}")
                if request.page_token.startswith("PA"):
                    page = [e for e in matching if e[0] < anchor][:size]
                else:
                    page = [e for e in matching if e[0] > anchor][-size:]
            records = [_resource(m) for _, m in page]
        older = bool(page) and matching[-1][0] < page[-1][0]
        newer = bool(page) and matching[0][0] > page[0][0]
        first = request.page * size
        payload = {
            "end": first + len(records) - 1 if records else first,
            "first_page_uri": request.uri(path, 0, None),
            "messages": records,
            "next_page_uri": request.uri(path, request.page + 1, "PA" + records[-1]["sid"]) if older else None,
            "page": request.page,
            "page_size": size,
            "previous_page_uri": (
                request.uri(path, max(request.page - 1, 0), "PB" + records[0]["sid"]) if newer else None
            ),
            "start": first,
            "uri": request.uri(path, request.page, request.page_token),
        }
        return _Reply(200, payload)

    # -- status callbacks (run on the callback pool) -----------------------------------------

    def _run_lifecycle(self, message: SentMessage, auth_token: str, steps: list[tuple[str, int | None]]) -> None:
        for status, error_code in steps:
            if self._stopped.is_set():
                return
            with self._lock:
                message.status, message.error_code = status, error_code
                if status == "sent":
                    message.sent_at = self._clock()
            self._post_callback(message, status, error_code, auth_token)

    def _post_callback(self, message: SentMessage, status: str, error_code: int | None, auth_token: str) -> None:
        url = message.status_callback
        assert url is not None
        params = _callback_params(message, status, error_code)
        # Signed like real Twilio, so the product's RequestValidator check runs for real.
        signature = RequestValidator(auth_token).compute_signature(url, params)
        headers = {"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"}
        try:
            with requests.Session() as session:
                session.trust_env = False  # Twilio does not go through the developer's proxy
                session.post(url, data=params, headers=headers, timeout=_CALLBACK_TIMEOUT).close()
        except requests.RequestException as exc:
            _log.warning("status callback %s for %s to %s failed: %s", status, message.sid, url, exc)

    # -- control surface for other processes -------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> _Reply:
        route = (method, path)
        if route == ("GET", "/_standin/messages"):
            with self._lock:
                return _Reply(200, [asdict(message) for message in self._messages])
        if route == ("GET", "/_standin/attempts"):
            with self._lock:
                return _Reply(200, [asdict(attempt) for attempt in self._attempts])
        if route == ("POST", "/_standin/reset"):
            self.reset()
            return _Reply(200, {"ok": True})
        programs = (
            "/_standin/fail", "/_standin/delay", "/_standin/accept_then_drop", "/_standin/accept_then_delay",
            "/_standin/services", "/_standin/queue_overflow", "/_standin/fail_after_accept",
        )
        if method == "POST" and path in programs:
            try:
                spec = json.loads(body or b"{}")
                self._program(path, spec)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                return _Reply(400, {"message": f"bad control request: {exc!r}"})
            return _Reply(200, {"ok": True})
        return _Reply(404, {"message": f"no control endpoint {method} {path}"})

    def _program(self, path: str, spec: dict[str, Any]) -> None:
        """Apply a JSON failure spec: {count, status, code, message, to, always}, {seconds, count}
        for /delay, {count, to} for /accept_then_drop or {seconds, count, to} for /accept_then_delay;
        or {sid, numbers} for /services, {service, on} for /queue_overflow, {to, code} for /fail_after_accept."""
        if path == "/_standin/services":
            self.set_service(str(spec["sid"]), [str(number) for number in spec["numbers"]])
        elif path == "/_standin/queue_overflow":
            self.queue_overflow(str(spec["service"]), bool(spec.get("on", True)))
        elif path == "/_standin/fail_after_accept":
            self.fail_after_accept(to=str(spec["to"]), code=int(spec.get("code", 21610)))
        elif path == "/_standin/delay":
            self.fail_with_delay(float(spec["seconds"]), int(spec.get("count", 1)))
        elif path == "/_standin/accept_then_drop":
            self.accept_then_drop(int(spec.get("count", 1)), to=spec.get("to"))
        elif path == "/_standin/accept_then_delay":
            self.accept_then_delay(float(spec["seconds"]), int(spec.get("count", 1)), to=spec.get("to"))
        elif spec.get("always"):
            status, code = int(spec.get("status", 400)), int(spec.get("code", 21211))
            self.fail_always(to=str(spec["to"]), status=status, code=code, message=spec.get("message"))
        else:
            status, code = int(spec.get("status", 429)), int(spec.get("code", 20429))
            to = spec.get("to")
            self.fail_next(
                int(spec.get("count", 1)), status=status, code=code, message=spec.get("message"), to=to
            )


class _Server(ThreadingHTTPServer):
    """Thread-per-connection HTTP server whose stop() really ends every connection thread.

    ThreadingHTTPServer only joins non-daemon threads, and non-daemon threads would keep the
    interpreter alive while a client idles on a keep-alive connection; so connection threads
    are daemons and this class tracks (and on stop, shuts and joins) them itself.
    """

    daemon_threads = True
    block_on_close = False  # joining is done by close_connections()
    request_queue_size = 128  # the default backlog of 5 drops bursts of 16+ concurrent connects

    def __init__(self, address: tuple[str, int], standin: TwilioStandin) -> None:
        self.standin = standin
        self._connections: set[socket.socket] = set()
        self._conn_threads: list[threading.Thread] = []
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), name="twilio-standin-conn", daemon=True
        )
        with self._connections_lock:
            self._connections.add(request)
            # Pruning finished threads here keeps the list bounded over thousands of connections.
            self._conn_threads = [t for t in self._conn_threads if t.is_alive()]
            self._conn_threads.append(thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self, timeout: float = 5.0) -> None:
        """Shut every open connection so blocked handler threads return, then join them."""
        with self._connections_lock:
            connections, threads = list(self._connections), list(self._conn_threads)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by its handler
                pass
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, Ctrl-C) are routine here; only real faults deserve a log.
        if isinstance(sys.exc_info()[1], OSError):
            return
        _log.exception("twilio stand-in failed serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like api.twilio.com; requests' pool reuses sockets
    timeout = _IDLE_TIMEOUT
    # Headers and body leave in one segment: written separately, Nagle plus the client's delayed
    # ACK held every response back ~40 ms on keep-alive connections.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server_version = "TwilioStandin/1.0"
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # access logs would drown the dev console's one line per SMS

    def _serve(self, method: str) -> None:
        body = self._read_body()
        if body is None:
            return
        standin = self.server.standin
        creates = _MESSAGES_PATH.fullmatch(urlsplit(self.path).path) if method == "POST" else None
        account = creates["account"] if creates else None
        if account:
            standin._opened(account, 1)
        try:
            reply = standin._handle(method, self.path, self.headers.get("Authorization"), body)
            if reply.delay > 0 and standin._stopped.wait(reply.delay) and reply.lost is not None:
                reply = replace(reply, lost="drop")  # stop() came first: a lost answer stays lost
            if reply.lost == "drop":
                # Hang up without a byte of response: the client sees RemoteDisconnected.
                self.close_connection = True
                return
            self._write(reply)
        finally:
            if account:
                standin._opened(account, -1)

    def _read_body(self) -> bytes | None:
        # The whole body must be consumed even for requests we reject, or the next request on
        # this keep-alive connection would start mid-body.
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_REQUEST_BYTES or "chunked" in self.headers.get("Transfer-Encoding", ""):
            self.close_connection = True
            self._write(_Reply(400, {"message": "a Content-Length of at most 1 MiB is required"}))
            return None
        return self.rfile.read(length)

    def _write(self, reply: _Reply) -> None:
        data = json.dumps(reply.payload).encode("utf-8")
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up, e.g. its timeout fired during an injected delay
            self.close_connection = True


# -- command line -----------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cli.twilio_standin", description="Serve a local stand-in for Twilio's Messages API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed at start)")
    parser.add_argument("--quiet", action="store_true", help="do not print each SMS")
    parser.add_argument(
        "--account",
        action="append",
        default=[],
        metavar="SID:TOKEN",
        help="accept only these credentials (repeatable); default: accept any",
    )
    parser.add_argument("--status-callbacks", action="store_true", help="POST signed sent/delivered callbacks")
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="MG_SID:NUMBER,NUMBER",
        help="a Messaging Service and its pool of sender numbers (repeatable)",
    )
    args = parser.parse_args(argv)
    pairs = [account.partition(":") for account in args.account]
    if any(not sep for _, sep, _ in pairs):
        parser.error("--account takes SID:TOKEN")
    args.accounts = {sid: token for sid, _, token in pairs} or None
    services = [service.partition(":") for service in args.service]
    if any(not sep or not _SERVICE_SID.fullmatch(sid) or not numbers.strip(",") for sid, sep, numbers in services):
        parser.error("--service takes MG_SID:NUMBER,NUMBER")
    args.services = {sid: [n for n in numbers.split(",") if n] for sid, _, numbers in services}
    return args


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM, then restore the previous handlers."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Polling is_set() instead of stop.wait(): the handler runs on this thread, and set()
        # would deadlock if the signal landed while wait() held the event's internal lock.
        while not stop.is_set():
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in in the foreground until SIGINT/SIGTERM."""
    args = _parse_args(argv)
    # flush=True: under honcho or a pipe, stdout is block-buffered and replies would show late.
    echo = None if args.quiet else functools.partial(print, flush=True)
    standin = TwilioStandin(
        args.host,
        args.port,
        accounts=args.accounts,
        echo=echo,
        status_callbacks=args.status_callbacks,
        services=args.services,
    )
    with standin:
        print(f"Twilio stand-in listening on {standin.url} (set client.api.base_url to it)", flush=True)
        _wait_for_signal()
    return 0


if __name__ == "__main__":
    sys.exit(main())
