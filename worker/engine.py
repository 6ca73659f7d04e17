"""Conversation engines: who answers a bot's messages.

A bot's `engine-url`, else ENGINE_URL, names an HTTP engine speaking Rasa's REST-channel
protocol, so an existing Rasa bot works unchanged; with neither, a built-in echo engine
answers, so the service runs with no engine at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis as redis_lib
import requests

from shared import metrics
from shared.bots import Bot
from shared.logging import get_logger
from shared.settings import Settings
from worker.http import read_environment_once

log = get_logger(__name__)

CONNECT_TIMEOUT = 3.05  # just over a TCP retransmit window
READ_TIMEOUT = 10.0
# A failing engine may hold a conversation's next message back this long at most.
DEADLINE_SECONDS = 14.0
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Answer:
    """One reply as an engine gives it: text, an image URL, or both."""

    text: str | None = None
    image: str | None = None


class EngineError(Exception):
    """The engine did not answer usably (5xx, timeout, connection refused, invalid JSON)."""

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
            "media": [{"url": m["url"], "content_type": m.get("content_type")} for m in message.get("media") or []],
            "event": message.get("event") or "message",
        },
    }


def parse_answers(payload: Any) -> list[Answer]:
    """Rasa answers a list of {recipient_id, text, image, ...}; items with neither text nor image are skipped."""
    if not isinstance(payload, list) or not all(isinstance(item, dict) for item in payload):
        raise EngineError("invalid", "expected a JSON list of objects")
    answers = []
    for item in payload:
        text, image = item.get("text"), item.get("image")
        if not isinstance(text, str) or not text:
            text = None
        if not isinstance(image, str) or not image:
            image = None
        if text or image:
            answers.append(Answer(text=text, image=image))
    return answers


class HttpEngine:
    """A Rasa REST-channel engine, retried with short backoff inside an overall deadline."""

    def __init__(self, url: str, redis: Any, *, deadline: float | None = None, connect_timeout: float | None = None,
                 read_timeout: float | None = None, backoff: tuple[float, ...] | None = None) -> None:
        self.url = url
        self._redis = redis
        # Module defaults are read here, not at definition, so they can be tuned in one place.
        self._deadline = DEADLINE_SECONDS if deadline is None else deadline
        self._connect_timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
        self._read_timeout = READ_TIMEOUT if read_timeout is None else read_timeout
        self._backoff = BACKOFF_SECONDS if backoff is None else backoff

    def answer(self, bot: Bot, message: Mapping[str, Any]) -> list[Answer]:
        """The engine's answers; after the retries the bot's fallback message, if it has one."""
        payload = rasa_payload(bot, message)
        deadline = time.monotonic() + self._deadline
        for attempt in range(len(self._backoff) + 1):
            try:
                return self._call(payload, deadline)
            except EngineError as error:
                pause = self._backoff[attempt] if attempt < len(self._backoff) else 0.0
                remaining = deadline - time.monotonic()
                log.warning("engine.failed", bot_id=bot.id, attempt=attempt + 1, error=str(error))
                if not error.retryable or attempt == len(self._backoff) or remaining <= pause + 0.1:
                    break
                time.sleep(pause)
        return self._fallback(bot, message)

    def _call(self, payload: dict[str, Any], deadline: float) -> list[Answer]:
        remaining = max(deadline - time.monotonic(), 0.1)
        started = time.monotonic()
        outcome = "ok"
        try:
            response = _session(self.url).post(
                self.url, json=payload,
                timeout=(min(self._connect_timeout, remaining), min(self._read_timeout, remaining)),
            )
            if response.status_code >= 400:
                # A 4xx refuses our request as such (a wrong URL, say): asking again would be refused too.
                retryable = response.status_code >= 500 or response.status_code == 429
                raise EngineError("http_error", f"HTTP {response.status_code}", retryable)
            try:
                return parse_answers(response.json())
            except ValueError:
                raise EngineError("invalid", "the answer is not JSON") from None
        except requests.Timeout as error:
            outcome = "timeout"
            raise EngineError("timeout", str(error)) from None
        except requests.RequestException as error:
            outcome = "connection_error"
            raise EngineError("connection_error", str(error)) from None
        except EngineError as error:
            outcome = error.outcome
            raise
        finally:
            self._record(outcome, time.monotonic() - started)

    def _record(self, outcome: str, seconds: float) -> None:
        log.info("engine.called", url=self.url, outcome=outcome, duration=round(seconds, 4))
        # Given a pipeline (the conversation's, executed with the replies), no round trip of our own.
        batched = isinstance(self._redis, redis_lib.client.Pipeline)
        pipe = self._redis if batched else self._redis.pipeline(transaction=False)
        metrics.incr(pipe, "sms_engine_calls", outcome=outcome)
        metrics.observe(pipe, "sms_engine_latency_seconds", seconds)
        if not batched:
            pipe.execute()

    def _fallback(self, bot: Bot, message: Mapping[str, Any]) -> list[Answer]:
        metrics.incr(self._redis, "sms_engine_calls", outcome="gave_up")
        log.error("engine.gave_up", bot_id=bot.id, message_sid=message.get("sid"),
                  fallback=bool(bot.fallback_message))
        return [Answer(text=bot.fallback_message)] if bot.fallback_message else []


_local = threading.local()


def _session(url: str) -> requests.Session:
    """One session per worker thread and engine origin: connections are reused, sessions are not
    shared across threads, and each reads the environment for its origin once (worker.http)."""
    sessions: dict[str, requests.Session] = _local.__dict__.setdefault("sessions", {})
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
    session = sessions.get(origin)
    if session is None:
        session = sessions[origin] = read_environment_once(requests.Session(), url)
    return session


_ECHO = EchoEngine()


def engine_for(bot: Bot, settings: Settings, redis: Any) -> Engine:
    """The bot's own engine, else the service's, else the echo engine. Its counts and timings go
    to `redis`, which may be a pipeline the caller executes afterwards."""
    url = bot.engine_url or settings.engine_url
    return HttpEngine(url, redis) if url else _ECHO
