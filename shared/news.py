"""News for the console's open pages: a conversation changed (a message logged, a delivery status,
a handoff). Published on Redis pub/sub, which keeps nothing: a page that was not listening reloads
what it shows anyway, so a lost notice costs a few seconds of staleness, never a message.
"""

from __future__ import annotations

import json
from typing import Any

from redis import RedisError

from shared import keys
from shared.logging import get_logger

log = get_logger(__name__)


def publish(redis: Any, bot_id: int | None, person: str | None) -> None:
    """Tell the open pages that this conversation changed (None: some conversation); never raises."""
    try:
        redis.publish(keys.CONSOLE_NEWS_CHANNEL, json.dumps({"bot": bot_id, "person": person}))
    except RedisError as error:
        log.debug("news.unpublished", error=error.__class__.__name__)


def read(raw: str) -> tuple[int | None, str | None]:
    news = json.loads(raw)
    return news.get("bot"), news.get("person")
