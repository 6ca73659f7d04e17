"""Sending as the bot: an operator (a script, a support tool) texts a person from the bot's number,
without the engine: `POST /app:<app>/graph/user:<id>/messages` with the admin token.

The message takes the path of an engine's reply (after any replies already queued for the person,
split, paced, logged, sent once), and is refused with a clear 4xx for an opted-out person, a number
that is not E.164, or nothing to send. An `Idempotency-Key` makes a retried request queue nothing new
for 24 hours: it gets the first answer again, so a script retrying after a timeout never texts twice.
"""

from __future__ import annotations

import json
from typing import Any

import redis as redis_lib
from flask import Response, request
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from shared import keys, messagelog, news, optout, schedule
from shared.conversations import replies_from, queue_replies
from shared.db import transaction
from shared.logging import get_logger
from shared.netguard import PUBLIC_HTTPS_URL, media_refusal
from shared.schemas import PhoneNumber, SendAt
from shared.tasks import kick_delivery
from shared.text import PlainText
from webhook import deps
from webhook.errors import failed, failure

log = get_logger(__name__)

IDEMPOTENCY_SECONDS = 24 * 3600
MAX_IDEMPOTENCY_KEY = 200
MAX_TEXT = 16_000  # ten messages of 1,600 characters
IN_PROGRESS = "in-progress"


class OperatorMessageSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    to = PhoneNumber(required=True)
    text = PlainText(load_default=None, allow_none=True,
                     validate=validate.Length(max=MAX_TEXT, error=f"at most {MAX_TEXT} characters"))
    media_url = fields.String(data_key="media-url", load_default=None, allow_none=True, validate=validate.Regexp(
        PUBLIC_HTTPS_URL, error="must be an https URL at a named host, e.g. https://example.com/image.jpg"))
    send_at = SendAt(load_default=None, allow_none=True)  # later, not now (shared.schedule)

    @validates_schema
    def _something_to_send(self, data: dict[str, Any], **_: Any) -> None:
        if not (data.get("text") or "").strip() and not data.get("media_url"):
            raise ValidationError("a message needs a text or a media-url", "text")


OPERATOR_MESSAGE = OperatorMessageSchema()


def send_as_bot(bot_id: int, body: object = None, idempotency_key: str | None = None) -> tuple[Response, int] | Response:
    """`body` and `idempotency_key` default to the request's JSON and Idempotency-Key header (the
    console passes its form's instead, so both take this one path)."""
    try:
        return _send_once(bot_id, body, idempotency_key)
    except redis_lib.RedisError:
        # Full under maxmemory, a read-only replica, down: nothing was queued, and nothing logged.
        response, status = failed("storage unavailable: nothing was queued; try again", 503)
        response.headers["Retry-After"] = "30"
        return response, status


def _send_once(bot_id: int, body: object, idempotency_key: str | None) -> tuple[Response, int] | Response:
    bot = deps.get_store().get(bot_id)
    if bot is None:
        return failed(f"no bot with id {bot_id}", 404)
    redis = deps.get_redis()
    key = (request.headers.get("Idempotency-Key", "") if idempotency_key is None else idempotency_key).strip()
    if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        return failed(f"Idempotency-Key must be printable, at most {MAX_IDEMPOTENCY_KEY} characters", 400)
    remembered_key = keys.operator_send(bot.id, key) if key else None
    if remembered_key is not None and not redis.set(remembered_key, IN_PROGRESS, nx=True, ex=IDEMPOTENCY_SECONDS):
        return _remembered(redis.get(remembered_key))
    try:
        answer, status = _send(bot, redis, request.get_json(silent=True) if body is None else body)
    except BaseException:
        _forget(redis, remembered_key)
        raise
    if remembered_key is not None:
        if status == 202:
            redis.set(remembered_key, json.dumps(answer), ex=IDEMPOTENCY_SECONDS)
        else:
            redis.delete(remembered_key)  # a refusal queued nothing; a corrected retry may use the key
    return Response(json.dumps(answer), status=status, content_type="application/json")


def _send(bot: Any, redis: Any, body: object) -> tuple[dict[str, Any], int]:
    if not isinstance(body, dict):
        return _refusal("expected a JSON object {to, text, media-url}", 400)
    try:
        data = OPERATOR_MESSAGE.load(body)
    except ValidationError as error:
        return _refusal("invalid message: " + "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in
                                                         error.normalized_messages().items()), 400, error.messages)
    media_url = data["media_url"]
    if media_url and (problem := media_refusal(media_url, development=deps.get_settings().development)):
        return _refusal(f"media-url {problem}", 400, {"media-url": [problem]})
    to = data["to"]
    conversation = keys.conversation_id(bot.id, to)
    sender, scope, opted_out = sending_from(bot, redis, to)
    if opted_out:
        return _refusal(f"{to} opted out of {scope} (texted STOP): nothing is sent until they text START",
                        409, {"to": ["opted out"]})
    waits = schedule.later(bot, to, data["send_at"])
    if waits is not None:  # a send_at, or the person's quiet hours: kept in the database until then
        with transaction(deps.get_engine()) as connection:
            scheduled_id = schedule.add(connection, bot.id, to, data["text"] or "", media_url, messagelog.OPERATOR,
                                        *waits)
        log.info("operator.scheduled", bot_id=bot.id, recipient=to, send_at=waits[0], reason=waits[1])
        return {"status": "Success", "data": {"queued": [], "scheduled": [
            {"id": scheduled_id, "send-at": waits[0], "reason": waits[1]}]}}, 202
    replies = replies_from(conversation, to, data["text"], media_url)
    # The log's record joins the log outbox in the step that queues the replies: Redis refusing
    # that step (full, read-only) leaves no row behind waiting "pending" for a send that never comes.
    reply_id = queue_replies(redis, conversation, replies,
                             log_record=messagelog.replies_record(replies, sender, messagelog.OPERATOR))
    if reply_id:
        kick_delivery(conversation, reply_id, broker=deps.get_broker())
    ids = [reply["id"] for reply in replies]
    log.info("operator.queued", bot_id=bot.id, recipient=to, replies=len(ids))
    news.publish(redis, bot.id, to)
    return {"status": "Success", "data": {"queued": ids}}, 202


def sending_from(bot: Any, redis: Any, to: str) -> tuple[str, str, bool]:
    """The number a send to `to` goes from, the opt-out scope it is under, and whether `to` opted out of it."""
    # It goes from the number the person last texted (a bot with several numbers or a service), else the
    # main one; a bot without a service never sends from a number it no longer lists (worker.outbound.sender_for).
    texted = redis.get(keys.texted(keys.conversation_id(bot.id, to))) if bot.pooled else None
    sender = texted if texted and (texted in bot.numbers or bot.messaging_service_sid) else bot.number
    scope = bot.opt_out_key(sender)
    return sender, scope, optout.is_opted_out(redis, scope, to) or _opted_out_in_database(scope, to)


def _forget(redis: Any, remembered_key: str | None) -> None:
    """Nothing was queued: a retry with the same Idempotency-Key may try again (if Redis lets us say so)."""
    if remembered_key is not None:
        try:
            redis.delete(remembered_key)
        except redis_lib.RedisError:
            pass


def _opted_out_in_database(bot_number: str, person: str) -> bool:
    with deps.get_engine().connect() as connection:
        record = optout.read(connection, bot_number, person)
    return bool(record and record.opted_out)


def _refusal(message: str, status: int, errors: Any = None) -> tuple[dict[str, Any], int]:
    return failure(message, errors), status


def _remembered(raw: str | None) -> tuple[Response, int]:
    if raw is None or raw == IN_PROGRESS:
        response, status = failed("a request with this Idempotency-Key is being handled; retry in a moment", 409)
        return response, status
    return Response(raw, status=202, content_type="application/json"), 202
