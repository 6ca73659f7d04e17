"""Conversation engines: who answers a bot's messages.

A bot's `engine-url`, else ENGINE_URL, names an HTTP engine speaking Rasa's REST-channel
protocol, so an existing Rasa bot works unchanged; with neither, a built-in echo engine
answers, so the service runs with no engine at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import urllib3

from shared.metrics import TALLY
from shared.bots import Bot, shown_url
from shared.logging import get_logger
from shared.netguard import AddressPolicy, RefusedAddress, allowed_media, without_credentials
from shared.settings import Settings
from shared.text import plain
from worker.http import origin, responding_by

log = get_logger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT = 3.05  # just over a TCP retransmit window
READ_TIMEOUT = 10.0
# A failing engine may hold a conversation's next message back this long at most.
DEADLINE_SECONDS = 14.0
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0)
# An answer is a few replies of at most 1600 characters: anything near this is not an answer.
MAX_ANSWER_BYTES = 256 * 1024
_CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True)
class Answer:
    """One reply as an engine gives it: text, an image URL, or both; or its request to hand the
    conversation to a human (Rasa's custom payload `{"custom": {"handoff": true, "note": ...}}`)."""

    text: str | None = None
    image: str | None = None
    handoff: bool = False
    note: str | None = None


class EngineError(Exception):
    """The engine did not answer usably (5xx, a redirect, timeout, connection refused, invalid JSON,
    too large, or an address a bot's engine may not be at)."""

    def __init__(self, outcome: str, detail: str, retryable: bool = True) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome
        self.retryable = retryable


class Engine(Protocol):
    def answer(self, bot: Bot, message: Mapping[str, Any]) -> list[Answer]: ...


class EchoEngine:
    """Answers `echo: <text>`: lets a bot be tried end to end before it has a real engine."""

    def answer(self, bot: Bot, message: Mapping[str, Any]) -> list[Answer]:
        return [Answer(text=f"echo: {message.get('body') or ''}")]


def rasa_payload(bot: Bot, message: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON Rasa's REST channel expects, with our extras under `metadata`."""
    return {
        "sender": message["sender"],
        "message": message.get("body") or "",
        "metadata": {
            "bot_id": bot.id,
            "to": message["to"],
            "message_sid": message["sid"],
            # Every text of the turn: several when a burst was merged into one (merge-window-ms).
            "message_sids": message.get("message_sids") or [message["sid"]],
            "media": media_of(message),
            "event": message.get("event") or "message",
        },
    }


def media_of(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An inbound message's media as engines (and a handoff-url) are given them."""
    return [{"url": m["url"], "content_type": m.get("content_type")} for m in message.get("media") or []]


def parse_answers(payload: Any, *, development: bool = False) -> list[Answer]:
    """Rasa answers a list of {recipient_id, text, image, ...}; items with neither text nor image are
    skipped, and an image Twilio may not be asked to fetch is dropped (shared.netguard)."""
    if not isinstance(payload, list) or not all(isinstance(item, dict) for item in payload):
        raise EngineError("invalid", "expected a JSON list of objects")
    answers = []
    for item in payload:
        custom = item.get("custom")
        if isinstance(custom, dict) and custom.get("handoff") is True:
            note = plain(custom["note"]) if isinstance(custom.get("note"), str) else None
            answers.append(Answer(handoff=True, note=note or None))
        text, image = item.get("text"), item.get("image")
        text = plain(text) if isinstance(text, str) else None
        if not text:
            text = None
        image = allowed_media(image if isinstance(image, str) and image else None, development=development)
        if text or image:
            answers.append(Answer(text=text, image=image))
    return answers


class HttpEngine:
    """A Rasa REST-channel engine, retried with short backoff inside an overall deadline.

    With a `policy` (a bot's own engine-url) it is reached only at addresses the policy allows;
    without one (the operator's ENGINE_URL) it is trusted. Either way a call ends by the deadline
    and reads at most `max_bytes` of answer, and redirects are not followed.
    """

    # The 4xx that mean "later", retried like a 5xx; any other 4xx would be refused again.
    LATER_STATUSES: frozenset[int] = frozenset({429})

    def __init__(self, url: str, *, policy: AddressPolicy | None = None, development: bool = False,
                 deadline: float | None = None, connect_timeout: float | None = None,
                 read_timeout: float | None = None, backoff: tuple[float, ...] | None = None,
                 max_bytes: int | None = None, service_url: str | None = None) -> None:
        self.url = url if policy is None else without_credentials(url)
        self._policy = policy
        # A bot's engine pointed at this very service (its PUBLIC_URL) would be handed every
        # conversation, and could loop the service's own endpoints into itself.
        self._calls_the_service = policy is not None and bool(service_url) and _origin(url) == _origin(service_url or "")
        self._development = development
        # Module defaults are read here, not at definition, so they can be tuned in one place.
        self._deadline = DEADLINE_SECONDS if deadline is None else deadline
        self._connect_timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
        self._read_timeout = READ_TIMEOUT if read_timeout is None else read_timeout
        self._backoff = BACKOFF_SECONDS if backoff is None else backoff
        self._max_bytes = MAX_ANSWER_BYTES if max_bytes is None else max_bytes

    # What its calls are counted and logged as.
    METRIC, EVENT = "sms_engine_calls", "engine"

    def answer(self, bot: Bot, message: Mapping[str, Any]) -> list[Answer]:
        """The engine's answers; after the retries the bot's fallback message, if it has one."""
        data = json.dumps(rasa_payload(bot, message)).encode()
        started = time.monotonic()
        answers = self._retried(bot, lambda deadline: self._call(data, {}, deadline, self._answers))
        # What the person waited for, retries included: the console's per-bot engine latency.
        TALLY.engine_answered(bot.id, time.monotonic() - started)
        return self._fallback(bot, message) if isinstance(answers, EngineError) else answers

    def _answers(self, body: bytes) -> list[Answer]:
        try:
            return parse_answers(json.loads(body), development=self._development)
        except ValueError:
            raise EngineError("invalid", "the answer is not JSON") from None

    def _retried(self, bot: Bot, attempt: Callable[[float], T]) -> T | EngineError:
        """`attempt(deadline)` until it succeeds, with backoff, within the deadline; the last error
        if it never did."""
        deadline = time.monotonic() + self._deadline
        number = 0
        while True:
            try:
                return attempt(deadline)
            except EngineError as error:
                pause = self._backoff[number] if number < len(self._backoff) else 0.0
                remaining = deadline - time.monotonic()
                log.warning(f"{self.EVENT}.failed", bot_id=bot.id, attempt=number + 1, error=str(error))
                if not error.retryable or number == len(self._backoff) or remaining <= pause + 0.1:
                    return error
                time.sleep(pause)
                number += 1

    def _call(self, data: bytes, headers: Mapping[str, str], deadline: float, read: Callable[[bytes], T]) -> T:
        """One attempt: POST `data` (JSON) and `read` the answer's body, over by `deadline` however the
        server paces its bytes; every way it can fail is an EngineError with its outcome, counted in metrics."""
        remaining = max(deadline - time.monotonic(), 0.1)
        started = time.monotonic()
        outcome = "ok"
        try:
            if self._calls_the_service:
                raise RefusedAddress(_origin(self.url)[0], "PUBLIC_URL", "the service itself")
            timeout = urllib3.Timeout(connect=min(self._connect_timeout, remaining),
                                      read=min(self._read_timeout, remaining))
            with responding_by(deadline), origin(self.url, self._policy).streaming(
                    "POST", self.url, data, {"Content-Type": "application/json", **headers}, timeout) as response:
                body = self._body(response)
            return read(body)
        except RefusedAddress as refused:
            outcome = "refused_address"
            log.warning(f"{self.EVENT}.refused_address", url=shown_url(self.url), address=refused.address,
                        reason=refused.reason)
            raise EngineError(outcome, str(refused), retryable=False) from None
        except (urllib3.exceptions.TimeoutError, TimeoutError) as error:
            outcome = "timeout"
            raise EngineError("timeout", str(error)) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            outcome = "connection_error"
            raise EngineError("connection_error", str(error)) from None
        except EngineError as error:
            outcome = error.outcome
            raise
        finally:
            self._record(outcome, time.monotonic() - started)

    def _body(self, response: urllib3.BaseHTTPResponse) -> bytes:
        """The answer's body, read by the deadline and no further than the byte cap."""
        status = response.status
        if 300 <= status < 400:
            # A redirect could point anywhere, inside included; an engine that moved needs its URL updated.
            raise EngineError("redirect", f"HTTP {status} to {response.headers.get('Location')!r}: "
                              "redirects are not followed", retryable=False)
        if status >= 400:
            # A 4xx refuses our request as such (a wrong URL, say): asking again would be refused too.
            raise EngineError("http_error", f"HTTP {status}", status >= 500 or status in self.LATER_STATUSES)
        if (response.length_remaining or 0) > self._max_bytes:  # its Content-Length
            raise self._too_large()
        body = bytearray()
        for chunk in response.stream(_CHUNK_BYTES, decode_content=True):
            body += chunk
            if len(body) > self._max_bytes:
                raise self._too_large()
        return bytes(body)

    def _too_large(self) -> EngineError:
        return EngineError("too_large", f"the answer is over {self._max_bytes} bytes", retryable=False)

    def _record(self, outcome: str, seconds: float) -> None:
        log.info(f"{self.EVENT}.called", url=shown_url(self.url), outcome=outcome, duration=round(seconds, 4))
        TALLY.incr(self.METRIC, outcome=outcome)
        if self.METRIC == HttpEngine.METRIC:
            TALLY.observe("sms_engine_latency_seconds", seconds)

    def _fallback(self, bot: Bot, message: Mapping[str, Any]) -> list[Answer]:
        TALLY.incr("sms_engine_calls", outcome="gave_up")
        log.error("engine.gave_up", bot_id=bot.id, message_sid=message.get("sid"),
                  fallback=bool(bot.fallback_message))
        return [Answer(text=bot.fallback_message)] if bot.fallback_message else []


def _origin(url: str) -> tuple[str, int | None]:
    """Host and port, the scheme's default port spelled out: what says two URLs reach one server."""
    parts = urlsplit(url)
    return (parts.hostname or "").lower().rstrip("."), parts.port or {"https": 443, "http": 80}.get(parts.scheme)


_ECHO = EchoEngine()


def engine_for(bot: Bot, settings: Settings) -> Engine:
    """The bot's own engine (kept to the addresses ENGINE_ALLOWED_NETWORKS and development allow),
    else the service's (trusted: the operator chose it), else the echo engine. Its counts and
    timings go to the process's metrics tally."""
    if bot.engine_url:
        return HttpEngine(bot.engine_url, policy=AddressPolicy.for_settings(settings),
                          development=settings.development, service_url=settings.public_url)
    if settings.engine_url:
        return HttpEngine(settings.engine_url, development=settings.development)
    return _ECHO
