"""Live updates for open console pages: Server-Sent Events fed from Redis pub/sub (shared.news).

A stream holds one of the web process's threads for as long as it is open, so a process keeps at
most CONSOLE_STREAMS of them and each ends after STREAM_SECONDS (the browser reconnects); past the
bound the stream answers 503 at once and the page polls instead. Twilio's webhook always keeps
WEB_THREADS - CONSOLE_STREAMS threads.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

from flask import Response, current_app
from flask.typing import ResponseReturnValue

from shared import keys, news
from shared.access import Principal
from shared.logging import get_logger
from webhook.console import auth, bp
from webhook.deps import get_redis, get_settings

log = get_logger(__name__)

STREAM_SECONDS = 300
HEARTBEAT_SECONDS = 10
POLL_SECONDS = 5  # how often a page without a stream reloads what it shows


class Streams:
    """The live streams a web process may keep open."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._free = threading.BoundedSemaphore(bound) if bound else None

    def take(self) -> bool:
        return self._free is not None and self._free.acquire(blocking=False)

    def give_back(self) -> None:
        assert self._free is not None
        self._free.release()


def streams() -> Streams:
    found = current_app.extensions.get("console-streams")
    if found is None:
        found = current_app.extensions.setdefault("console-streams", Streams(get_settings().console_streams))
    return found


@bp.get("/live")
def live() -> ResponseReturnValue:
    """`change` events ({"bot", "person"}) for the operator's bots; 503 (poll instead) past the bound."""
    bounded = streams()
    if not bounded.take():
        return Response(f"retry: {POLL_SECONDS * 1000}\n\n", status=503, content_type="text/event-stream",
                        headers={"Retry-After": str(POLL_SECONDS)})
    try:
        pubsub = get_redis().pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.CONSOLE_NEWS_CHANNEL)
    except BaseException:
        bounded.give_back()
        raise
    return Response(_events(pubsub, auth.principal(), bounded), content_type="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _events(pubsub: object, principal: Principal, bounded: Streams) -> Iterator[str]:
    ends = time.monotonic() + STREAM_SECONDS
    beat = time.monotonic() + HEARTBEAT_SECONDS
    try:
        yield f"retry: {POLL_SECONDS * 1000}\n: open\n\n"
        while time.monotonic() < ends:
            message = pubsub.get_message(timeout=1.0)  # type: ignore[attr-defined]
            if message is not None and message.get("type") == "message":
                for bot_id, person in news.read(message["data"]):
                    if bot_id is None or principal.reaches(bot_id):
                        yield f"event: change\ndata: {json.dumps({'bot': bot_id, 'person': person})}\n\n"
            if time.monotonic() >= beat:
                beat = time.monotonic() + HEARTBEAT_SECONDS
                yield ": keep-alive\n\n"  # a proxy that closes idle connections sees traffic
    finally:
        pubsub.close()  # type: ignore[attr-defined]
        bounded.give_back()
