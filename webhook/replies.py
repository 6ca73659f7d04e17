"""Replies that engines post later (Rasa's callback channel, Mammut's asynchronous thoughts).

They join the recipient's conversation outbox, in the order given, and go out the same way as
the replies a worker got from the engine directly.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from flask import Blueprint, jsonify, request
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validates, validates_schema
from sqlalchemy import Connection

from shared import handoff, keys, messagelog, schedule
from shared.bots import Bot
from shared.conversations import queue_replies, replies_from
from shared.db import transaction
from shared.logging import get_logger
from shared.netguard import allowed_media
from shared.phone import is_e164
from shared.schemas import SendAt
from shared.tasks import kick_delivery
from webhook import deps
from webhook.errors import failed

log = get_logger(__name__)
bp = Blueprint("replies", __name__)


class CallbackReplySchema(Schema):
    """One reply as Rasa's callback channel posts it."""

    class Meta:
        unknown = EXCLUDE

    recipient_id = fields.String(required=True)
    text = fields.String(load_default=None, allow_none=True)
    image = fields.String(load_default=None, allow_none=True)
    send_at = SendAt(load_default=None, allow_none=True)  # later, not now (shared.schedule)

    @validates("recipient_id")
    def _e164(self, value: str, **_: Any) -> None:
        if not is_e164(value):
            raise ValidationError("must be a phone number in E.164 format, e.g. +11234567890")

    @validates_schema
    def _something_to_send(self, data: dict[str, Any], **_: Any) -> None:
        if not data.get("text") and not data.get("image"):
            raise ValidationError("a reply needs a text or an image", "text")


REPLIES = CallbackReplySchema(many=True)


# One request pushes to at most this many recipients' conversations.
MAX_REPLIES_PER_REQUEST = 100


@bp.post("/channels/sms/callback/<int:bot_id>")
def receive_replies(bot_id: int):  # type: ignore[no-untyped-def]
    bot = deps.get_bots().by_id(bot_id)
    if not _authorized(bot):
        response, status = failed("missing or wrong bearer token (Authorization: Bearer <the bot's engine token>)", 401)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response, status
    if bot is None:
        return failed(f"no bot {bot_id}", 404)
    body = request.get_json(silent=True)
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list) or not body:
        return failed("expected a JSON object {recipient_id, text, image} or a non-empty list of them", 400)
    if len(body) > MAX_REPLIES_PER_REQUEST:
        return failed(f"at most {MAX_REPLIES_PER_REQUEST} replies per request", 413)
    try:
        answers = REPLIES.load(body)
    except ValidationError as error:
        return failed(f"invalid reply: {_describe(error.messages)}", 400, {"replies": error.messages})
    recipients = sorted({answer["recipient_id"] for answer in answers})
    with deps.get_engine().connect() as connection:
        cold = _outside_push_window(connection, bot, recipients)
        paused = handoff.active_of(connection, bot.id, recipients) if not cold else {}
    if cold:
        log.warning("callback.refused", bot_id=bot_id, reason="outside_push_window", recipients=len(cold))
        return failed(f"{len(cold)} recipient(s) have not written to the bot in the last {bot.limits.push_window_days} "
                      "days (push-window-days; allow-cold-push lets the engine write first)", 403,
                      {"recipient_id": sorted(cold)})
    if paused:
        # A human has these conversations: the bot's engine stays out of them until they are resumed.
        log.warning("callback.refused", bot_id=bot_id, reason="handed_off", recipients=len(paused))
        return failed(f"{len(paused)} recipient(s) are talking with a human (handoff): the engine may write to them "
                      "again once the conversation is resumed", 409, {"recipient_id": sorted(paused)})
    queued, later = _queue(bot, _without_refused_media(answers, bot_id))
    log.info("callback.queued", bot_id=bot_id, replies=queued, scheduled=len(later))
    return jsonify({"status": "Success", "data": {"queued": queued, "scheduled": later}}), 202


def _authorized(bot: Bot | None) -> bool:
    """The bot's own engine token (it authorizes this bot's callback and nothing else), or the
    operator's admin token. Without a bot, only the admin token (so an unknown id says 404 only to
    the operator)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    if bot is not None and bot.accepts_engine_token(token):
        return True
    admin = deps.get_settings().admin_api_token or ""
    return bool(admin) and hmac.compare_digest(token.encode(), admin.encode())


def _outside_push_window(connection: Connection, bot: Bot, recipients: list[str]) -> set[str]:
    """The recipients who have not written to the bot within its push-window-days (none when the
    bot allows cold pushes): an engine pushes only into conversations a person started."""
    if bot.limits.allow_cold_push:
        return set()
    since = time.time() - bot.limits.push_window_days * 86400
    return set(recipients) - messagelog.people_who_wrote(connection, bot.id, recipients, since)


def _without_refused_media(answers: list[dict[str, Any]], bot_id: int) -> list[dict[str, Any]]:
    """The replies with every image Twilio may not fetch dropped (shared.netguard), as for an
    engine's direct answers: the text still goes, and a reply left with nothing is not sent."""
    development = deps.get_settings().development
    kept = []
    for answer in answers:
        image = allowed_media(answer["image"], development=development, bot_id=bot_id)
        if answer["text"] or image:
            kept.append({**answer, "image": image})
    return kept


def _queue(bot: Bot, answers: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """Log the replies (one transaction), then queue each recipient's in one step, in the order
    given, and kick their delivery; those with a send_at, or for a person in quiet hours, are kept
    for later instead (shared.schedule). The number queued, and the ids of those kept."""
    bot_id = bot.id
    grouped: dict[str, list[dict[str, Any]]] = {}
    waiting: list[tuple[dict[str, Any], tuple[float, str]]] = []
    for answer in answers:
        conversation = keys.conversation_id(bot_id, answer["recipient_id"])
        waits = schedule.later(bot, answer["recipient_id"], answer["send_at"])
        if waits is not None:
            waiting.append((answer, waits))
            continue
        grouped.setdefault(conversation, []).extend(
            replies_from(conversation, answer["recipient_id"], answer["text"], answer["image"])
        )
    with transaction(deps.get_engine()) as connection:
        messagelog.record_replies(connection, [reply for replies in grouped.values() for reply in replies],
                                  bot.number)
        later = [schedule.add(connection, bot_id, answer["recipient_id"], answer["text"] or "", answer["image"],
                              messagelog.CALLBACK, *waits) for answer, waits in waiting]
    redis, broker = deps.get_redis(), deps.get_broker()
    for conversation, replies in grouped.items():
        reply_id = queue_replies(redis, conversation, replies)
        if reply_id:
            kick_delivery(conversation, reply_id, broker=broker)
    return sum(len(replies) for replies in grouped.values()), later


def _describe(messages: Any) -> str:
    """marshmallow's nested errors as one line naming the fields, e.g. `0.recipient_id: must be ...`."""
    if isinstance(messages, dict):
        return "; ".join(f"{_join(key, inner)}" for key, inner in messages.items())
    if isinstance(messages, list):
        return " ".join(str(item) for item in messages)
    return str(messages)


def _join(key: Any, inner: Any) -> str:
    text = _describe(inner)
    return f"{key}.{text}" if isinstance(inner, dict) else f"{key}: {text}"
