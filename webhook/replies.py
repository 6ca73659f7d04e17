"""Replies that engines post later (Rasa's callback channel, Mammut's asynchronous thoughts).

They join the recipient's conversation outbox, in the order given, and go out the same way as
the replies a worker got from the engine directly.
"""

from __future__ import annotations

import hmac
from typing import Any

from flask import Blueprint, jsonify, request
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validates, validates_schema

from shared import keys, messagelog
from shared.conversations import queue_replies, replies_from
from shared.db import transaction
from shared.logging import get_logger
from shared.phone import is_e164
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

    @validates("recipient_id")
    def _e164(self, value: str, **_: Any) -> None:
        if not is_e164(value):
            raise ValidationError("must be a phone number in E.164 format, e.g. +11234567890")

    @validates_schema
    def _something_to_send(self, data: dict[str, Any], **_: Any) -> None:
        if not data.get("text") and not data.get("image"):
            raise ValidationError("a reply needs a text or an image", "text")


REPLIES = CallbackReplySchema(many=True)


@bp.before_request
def authenticate():  # type: ignore[no-untyped-def]
    expected = deps.get_settings().admin_api_token or ""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if not expected or scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        response, status = failed("missing or wrong bearer token (Authorization: Bearer $ADMIN_API_TOKEN)", 401)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response, status
    return None


@bp.post("/channels/sms/callback/<int:bot_id>")
def receive_replies(bot_id: int):  # type: ignore[no-untyped-def]
    body = request.get_json(silent=True)
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list) or not body:
        return failed("expected a JSON object {recipient_id, text, image} or a non-empty list of them", 400)
    try:
        answers = REPLIES.load(body)
    except ValidationError as error:
        return failed(f"invalid reply: {_describe(error.messages)}", 400, {"replies": error.messages})
    bot = deps.get_bots().by_id(bot_id)
    if bot is None:
        return failed(f"no bot {bot_id}", 404)
    queued = _queue(bot_id, bot.number, answers)
    log.info("callback.queued", bot_id=bot_id, replies=queued)
    return jsonify({"status": "Success", "data": {"queued": queued}}), 202


def _queue(bot_id: int, bot_number: str, answers: list[dict[str, Any]]) -> int:
    """Log the replies (one transaction), then queue each recipient's in one step, in the order
    given, and kick their delivery."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for answer in answers:
        conversation = keys.conversation_id(bot_id, answer["recipient_id"])
        grouped.setdefault(conversation, []).extend(
            replies_from(conversation, answer["recipient_id"], answer["text"], answer["image"])
        )
    with transaction(deps.get_engine()) as connection:
        messagelog.record_replies(connection, [reply for replies in grouped.values() for reply in replies],
                                  bot_number)
    redis, broker = deps.get_redis(), deps.get_broker()
    for conversation, replies in grouped.items():
        reply_id = queue_replies(redis, conversation, replies)
        if reply_id:
            kick_delivery(conversation, reply_id, broker=broker)
    return sum(len(replies) for replies in grouped.values())


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
