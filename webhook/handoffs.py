"""Human handoff through the registry API: pause the bot for one person, resume it, say which
conversations are paused (shared.handoff keeps the record; worker.handoff forwards their messages).

`POST /app:<app>/graph/user:<id>/conversations/<E.164>/handoff` (optional JSON `{"note": "..."}`)
pauses the bot for that person until the bot's handoff-timeout; `DELETE` on the same path resumes it.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from redis import RedisError
from sqlalchemy.exc import SQLAlchemyError

from shared import handoff, metrics, news
from shared.bots import Bot
from shared.logging import get_logger
from shared.text import plain
from webhook import deps
from webhook.errors import failed

log = get_logger(__name__)


def pause(bot: Bot, person: str, body: dict[str, Any]) -> tuple[Response, int] | Response:
    """`body`: the request's JSON object, maybe empty."""
    note, problem = _note(body)
    if problem:
        return failed(f"note {problem}", 400, {"note": [problem]})
    try:
        paused = handoff.pause(deps.get_engine(), deps.get_redis(), bot.id, person, by=handoff.BY_OPERATOR,
                               timeout=bot.controls.handoff_timeout, note=note)
    except (SQLAlchemyError, RedisError) as error:
        return _unavailable("pause", bot, error)
    log.info("handoff.paused", bot_id=bot.id, person=person, by=handoff.BY_OPERATOR, until=paused.until)
    metrics.incr(deps.get_redis(), "sms_handoffs", event="paused", by=handoff.BY_OPERATOR)
    news.publish(deps.get_redis(), bot.id, person)
    return jsonify(status="Success", data={"person": person, "handoff": paused.public()})


def resume(bot: Bot, person: str) -> tuple[Response, int] | Response:
    try:
        ended = handoff.resume(deps.get_engine(), deps.get_redis(), bot.id, person)
    except (SQLAlchemyError, RedisError) as error:
        return _unavailable("resume", bot, error)
    log.info("handoff.resumed", bot_id=bot.id, person=person, was_paused=ended is not None)
    if ended is not None:
        metrics.incr(deps.get_redis(), "sms_handoffs", event="resumed", by=handoff.BY_OPERATOR)
    news.publish(deps.get_redis(), bot.id, person)
    return jsonify(status="Success", data={"person": person, "handoff": handoff.NOT_PAUSED,
                                           "resumed": ended is not None})


def shown(bot_id: int, people: list[str]) -> dict[str, dict[str, Any]]:
    """Each person's handoff state as the conversation list and log show it."""
    with deps.get_engine().connect() as connection:
        active = handoff.active_of(connection, bot_id, people)
    return {person: active[person].public() if person in active else handoff.NOT_PAUSED for person in people}


def _note(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """The optional note of a pause, or why it cannot be taken."""
    note = body.get("note")
    if note is not None and not isinstance(note, str):
        return None, "must be a string"
    if note and len(note) > handoff.MAX_NOTE:  # as sent: control characters do not buy room
        return None, f"must be at most {handoff.MAX_NOTE} characters"
    return (plain(note) or None) if note else None, None


def _unavailable(action: str, bot: Bot, error: Exception) -> tuple[Response, int]:
    log.error(f"handoff.{action}_failed", bot_id=bot.id, error=error.__class__.__name__)
    return failed(f"could not {action} the conversation just now (storage unavailable): try again", 503)
