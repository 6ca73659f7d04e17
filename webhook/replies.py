"""Replies that engines post later (Rasa's callback channel, Mammut's asynchronous thoughts).

They join the recipient's conversation outbox, in the order given, and go out the same way as
the replies a worker got from the engine directly.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import time
from typing import Any

import redis as redis_lib
from flask import Blueprint, Response, jsonify, request
from flask.typing import ResponseReturnValue
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validates, validates_schema
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from shared import handoff, keys, messagelog, metrics, schedule
from shared.bots import MAX_BOT_ID, Bot
from shared.conversations import Pushed, capped, last_wrote, push_replies, replies_from
from shared.db import transaction
from shared.logging import get_logger
from shared.netguard import allowed_media
from shared.phone import is_e164
from shared.schemas import SendAt
from shared.text import PlainText
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
    text = PlainText(load_default=None, allow_none=True)
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


@bp.post(f"/channels/sms/callback/<int(min=1, max={MAX_BOT_ID}):bot_id>")
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
    try:
        cold, paused = _who_may_not_get_it(deps.get_redis(), bot, recipients)
    except (redis_lib.RedisError, SQLAlchemyError) as error:
        return _unavailable(bot_id, error)
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
    now, waiting = _held(bot, _without_refused_media(answers, bot_id))
    grouped, cut = _capped(bot, now)
    try:
        # Those kept for later are written in a transaction that commits only once the rest are queued:
        # a push Redis refuses schedules nothing either. Without any, the database is not asked at all.
        with transaction(deps.get_engine()) if waiting else contextlib.nullcontext() as connection:
            later = [schedule.add(connection, bot_id, answer["recipient_id"], answer["text"] or "", answer["image"],
                                  messagelog.CALLBACK, *waits) for answer, waits in waiting]
            pushed = push_replies(deps.get_redis(), grouped, {
                conversation: messagelog.replies_record(replies, bot.number) for conversation, replies in grouped.items()},
                bot.limits)
            if pushed.reason is not None:
                raise _Refused(pushed)
    except _Refused as refused:
        return _too_many(bot, grouped, refused.pushed)
    except (redis_lib.RedisError, SQLAlchemyError) as error:  # out of memory, a read-only replica, unreachable
        return _unavailable(bot_id, error)
    if cut:
        _count("sms_answers_capped", cut)
    _kick(pushed)
    queued = sum(len(replies) for replies in grouped.values())
    log.info("callback.queued", bot_id=bot_id, replies=queued, scheduled=len(later))
    return jsonify({"status": "Success", "data": {"queued": queued, "scheduled": later}}), 202


class _Refused(Exception):
    """A push the bot's limits refused: what was scheduled with it is rolled back."""

    def __init__(self, pushed: Pushed) -> None:
        super().__init__(pushed.reason)
        self.pushed = pushed


def _held(bot: Bot, answers: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], tuple[float, str]]]]:
    """The answers to queue now, and those to keep for later with when and why: a send_at, or the
    person's quiet hours (shared.schedule)."""
    now: list[dict[str, Any]] = []
    waiting: list[tuple[dict[str, Any], tuple[float, str]]] = []
    for answer in answers:
        waits = schedule.later(bot, answer["recipient_id"], answer["send_at"])
        if waits is None:
            now.append(answer)
        else:
            waiting.append((answer, waits))
    return now, waiting


# A callback refused while Redis or the database cannot take it is worth retrying after this long.
STORAGE_RETRY_SECONDS = 30


def _unavailable(bot_id: int, error: Exception) -> tuple[Response, int]:
    """503: nothing of the request was queued, nor logged."""
    log.warning("callback.refused", bot_id=bot_id, reason="storage", error=error.__class__.__name__)
    return _retry_after(failed("storage unavailable: nothing was queued; try again", 503), STORAGE_RETRY_SECONDS)


def _kick(pushed: Pushed) -> None:
    """Start each idle outbox's sends; one Redis refuses is kicked by the sweeper (the push step
    put its conversation in the pending set), so the push stays accepted."""
    broker = deps.get_broker()
    for conversation, reply_id in pushed.kicks.items():
        try:
            kick_delivery(conversation, reply_id, broker=broker)
        except redis_lib.RedisError as error:
            log.warning("callback.kick_deferred", error=error.__class__.__name__)


def _capped(bot: Bot, answers: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Each recipient's replies, in the order given, cut to the bot's max-replies and max-segments as
    one direct answer is (a callback can make the bot say no more to a person than one answer can),
    and how many recipients' were cut."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    cut_for = 0
    for answer in answers:
        conversation = keys.conversation_id(bot.id, answer["recipient_id"])
        replies = grouped.setdefault(conversation, [])
        if len(replies) <= bot.limits.max_replies:  # enough to know the push is cut: the rest need not be built
            replies += replies_from(conversation, answer["recipient_id"], answer["text"], answer["image"])
    for conversation, replies in grouped.items():
        cut = capped(replies, bot.limits.max_replies, bot.limits.max_segments)
        if cut.replies_cut or cut.truncated:
            log.warning("callback.capped", bot_id=bot.id, replies_sent=len(cut.replies), truncated=cut.truncated,
                        max_replies=bot.limits.max_replies, max_segments=bot.limits.max_segments)
            cut_for += 1
        grouped[conversation] = cut.replies
    return grouped, cut_for


def _too_many(bot: Bot, grouped: dict[str, list[dict[str, Any]]], pushed: Pushed) -> ResponseReturnValue:
    """429 for a bot whose pushes today reached max-messages-per-day, or naming the recipient whose
    outbox is full (max-queued-replies) or who had this minute's replies (max-replies-per-minute),
    with a Retry-After for when it may pass."""
    limits = bot.limits
    if pushed.refused_for is None:  # the bot's day
        wait = 86400 - int(time.time()) % 86400
        log.warning("callback.refused", bot_id=bot.id, reason="max_day", retry_after=wait)
        _count("sms_callbacks_refused", reason=pushed.reason)
        return _retry_after(failed(f"the bot's engine pushed max-messages-per-day ({limits.max_messages_per_day}) "
                                   f"replies today (UTC): nothing was queued; retry after {wait} s", 429), wait)
    _, person = keys.split_conversation_id(pushed.refused_for)
    if pushed.reason == "minute":
        wait = 60 - int(time.time()) % 60
        message = f"{person} had max-replies-per-minute ({limits.max_replies_per_minute}) replies this minute"
    else:
        # The outbox drains at the sender's pace (messages-per-second, in segments: an estimate).
        excess = pushed.waiting + len(grouped[pushed.refused_for]) - limits.max_queued_replies
        wait = max(1, math.ceil(excess / bot.messages_per_second))
        message = (f"{person} has {pushed.waiting} replies waiting; a push may bring it to at most "
                   f"max-queued-replies ({limits.max_queued_replies})")
    log.warning("callback.refused", bot_id=bot.id, reason=f"max_{pushed.reason}", retry_after=wait)
    _count("sms_callbacks_refused", reason=pushed.reason)
    return _retry_after(failed(f"{message}: nothing was queued; retry after {wait} s", 429,
                               {"recipient_id": [person]}), wait)


def _count(name: str, amount: int = 1, **labels: object) -> None:
    """A metric, if Redis takes it: a full Redis refuses the count, not the answer."""
    try:
        metrics.incr(deps.get_redis(), name, amount, **labels)
    except redis_lib.RedisError:
        pass


def _retry_after(answer: tuple[Response, int], seconds: int) -> tuple[Response, int]:
    response, status = answer
    response.headers["Retry-After"] = str(seconds)
    return response, status


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


def _who_may_not_get_it(redis: Any, bot: Bot, recipients: list[str]) -> tuple[set[str], dict[str, Any]]:
    """The recipients outside the push window, and (when there are none) those a human has. Redis
    answers for people who just wrote and for a bot whose handoffs copy is loaded and names none of
    them, so an engine answering at once is served even while the database is slow or down."""
    pipe = redis.pipeline(transaction=False)
    last_wrote(pipe, bot.id, recipients)
    pipe.hmget(keys.handoffs(bot.id), [handoff.LOADED, *recipients])
    marks, (loaded, *listed) = pipe.execute()
    unmarked = [] if bot.limits.allow_cold_push else _unmarked(bot, recipients, marks)
    if not unmarked and loaded and not any(listed):
        return set(), {}
    with deps.get_engine().connect() as connection:
        cold = _outside_push_window(connection, bot, unmarked)
        return cold, handoff.active_of(connection, bot.id, recipients) if not cold else {}


def _unmarked(bot: Bot, recipients: list[str], marks: list[int | None]) -> list[str]:
    """The recipients the webhook has not seen write within the push window (its mark, kept 48
    hours: shared.conversations.last_wrote, 0 when it has none)."""
    since = time.time() - bot.limits.push_window_days * 86400
    return [person for person, mark in zip(recipients, marks) if mark is None or float(mark) < since]


def _outside_push_window(connection: Connection, bot: Bot, unmarked: list[str]) -> set[str]:
    """Of the recipients not seen writing lately, those who have not written to the bot within its
    push-window-days either, by the log: an engine pushes only into conversations a person started."""
    if not unmarked:
        return set()
    since = time.time() - bot.limits.push_window_days * 86400
    return set(unmarked) - messagelog.people_who_wrote(connection, bot.id, unmarked, since)


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
