"""News for the console's open pages: a conversation changed (a message logged, a delivery status,
a handoff). Published on Redis pub/sub, which keeps nothing: a page that was not listening reloads
what it shows anyway, so a lost notice costs a few seconds of staleness, never a message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from redis import RedisError

from shared import keys
from shared.logging import get_logger

log = get_logger(__name__)


def publish(redis: Any, bot_id: int | None, person: str | None) -> None:
    """Tell the open pages that this conversation changed (None: some conversation); never raises."""
    _send(redis, {"bot": bot_id, "person": person})


def publish_all(redis: Any, changed: Iterable[tuple[int | None, str | None]]) -> None:
    """Tell the open pages of several conversations at once, in one notice (the log drain's batch
    would otherwise cost a round trip per conversation); never raises."""
    changes = [[bot_id, person] for bot_id, person in changed]
    if len(changes) == 1:
        publish(redis, *changes[0])
    elif changes:
        _send(redis, {"changes": changes})


def _send(redis: Any, notice: dict[str, Any]) -> None:
    try:
        redis.publish(keys.CONSOLE_NEWS_CHANNEL, json.dumps(notice))
    except RedisError as error:
        log.debug("news.unpublished", error=error.__class__.__name__)


def read(raw: str | bytes) -> list[tuple[int | None, str | None]]:
    """The conversations a notice names. A notice of another shape (a release's to come) reads as
    "some conversation": the page refreshes what it shows."""
    try:
        notice = json.loads(raw)
    except ValueError:
        return [(None, None)]
    if not isinstance(notice, dict):
        return [(None, None)]
    if "changes" in notice:
        changes = notice["changes"]
        if isinstance(changes, list) and all(isinstance(c, list) and len(c) == 2 for c in changes):
            return [(bot_id, person) for bot_id, person in changes]
        return [(None, None)]
    return [(notice.get("bot"), notice.get("person"))]
