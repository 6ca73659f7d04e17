"""Twilio's delivery status callbacks for the messages the workers sent.

The workers set StatusCallback to PUBLIC_URL/channels/sms/status on each send; callbacks arrive out
of order, before or after the worker recorded the MessageSid, and shared.messagelog keeps a status
from ever moving backwards. Not Twilio's inbound hot path: this route writes the database itself.

A Messaging Service reports late what a number refuses at once: an opt-out (21610) opts the person
out of the number it went from, as the worker does; a full queue (30001) has a worker send the
reply again later (shared.tasks.request_resend).
"""

from __future__ import annotations

from flask import Blueprint, Response, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import MultiDict

from shared import conversations, keys, messagelog, metrics, news, optout
from shared.bots import Bot, BotCache, is_service_sid
from shared.phone import is_e164
from shared.conversations import DEDUPE_TTL, note_callback, resend_attempt
from shared.tasks import request_resend
from shared.db import transaction
from shared.logging import get_logger
from shared.poolnumbers import POOL_NUMBERS
from shared.schema import STATUSES
from shared.twilio_errors import HINTS, STATUS_HINTS, Action, action_for, backoff
from webhook import deps, twilio_auth
from webhook.twilio_auth import UNAVAILABLE, acknowledgement, refusal

log = get_logger(__name__)
NOT_THIS_BOTS_MESSAGE = "not_this_bots_message"
MAX_REPLY_ID = 100  # reply ids are an inbound MessageSid and a number, or 32 hex digits
bp = Blueprint("status", __name__)
twilio_auth.guard(bp)
# From, or MessagingServiceSid for a message whose sender Twilio had not picked yet.
route = twilio_auth.TwilioRoute(
    "status", required=("MessageSid", "MessageStatus", "To"), metric="sms_status_callbacks",
    labels=lambda reason: {"status": "rejected"},
)
FINAL_FAILURES = frozenset({"failed", "undelivered", "canceled"})


@bp.post("/channels/sms/status")
@bp.post("/channels/sms/status/")
def status_callback() -> Response:
    return route.handle(_record)


def _record(form: MultiDict[str, str]) -> Response:
    if not form.get("From") and not form.get("MessagingServiceSid"):
        return route.reject(400, "missing_fields", message_sid=form["MessageSid"], missing=["From"])
    bot = sender_bot(deps.get_bots(), form.get("From"), form.get("MessagingServiceSid"))
    if bot is None:
        return route.reject(404, "unknown_number", message_sid=form["MessageSid"], number=form.get("From"))
    reason = twilio_auth.rejection(request, bot, deps.get_settings().public_url)
    if reason is not None:
        return route.reject(403, reason, message_sid=form["MessageSid"], bot_id=bot.id)
    status, code = form["MessageStatus"], _error_code(form.get("ErrorCode"))
    redis = deps.get_redis()
    if status not in STATUSES:
        # Acknowledged all the same: Twilio would only retry it. Counted as "other", so a caller
        # cannot invent metric series.
        metrics.incr(redis, "sms_status_callbacks", status="other")
        log.warning("status.rejected", reason="unknown_status", message_sid=form["MessageSid"], bot_id=bot.id,
                    status=status[:32])
        return acknowledgement()
    try:
        current = _store(bot, form["MessageSid"], status, code, form["To"],
                         form.get("From") or form.get("MessagingServiceSid") or "")
    except SQLAlchemyError as error:
        log.error("status.unavailable", message_sid=form["MessageSid"], bot_id=bot.id, error=error.__class__.__name__)
        return refusal(503, UNAVAILABLE)  # Twilio retries
    if current is None:
        # Acknowledged and ignored, like an unknown status: a 4xx would only fill Twilio's debugger with
        # retries of a callback (after a number moved to another bot, say) that will never be recorded.
        metrics.incr(redis, "sms_status_callbacks", status="rejected")
        log.warning("status.rejected", reason=NOT_THIS_BOTS_MESSAGE, message_sid=form["MessageSid"], bot_id=bot.id)
        return acknowledgement()
    metrics.incr(redis, "sms_status_callbacks", status=status)
    if bot.messaging_service_sid:  # the number its service picked, maybe unlisted: a bot number too
        POOL_NUMBERS.learn(redis, form.get("From"), bot.id)
    reply_id = request.args.get("reply")
    if reply_id and len(reply_id) <= MAX_REPLY_ID:
        # The worker may not know this send happened (its answer was lost): tell it the MessageSid.
        note_callback(redis, keys.conversation_id(bot.id, form["To"]), reply_id, form["MessageSid"])
    log.info("status.callback", message_sid=form["MessageSid"], bot_id=bot.id, status=status, current=current,
             error_code=code, recipient=form["To"])
    if status in FINAL_FAILURES:
        log.warning("status.failed", message_sid=form["MessageSid"], bot_id=bot.id, status=status, error_code=code,
                    recipient=form["To"], hint=HINTS.get(code or 0) or STATUS_HINTS.get(status))
        if code is not None and action_for(None, code) is Action.RETRY_SLOWLY and reply_id:
            _resend_later(bot, form, reply_id[:MAX_REPLY_ID], code)
    return acknowledgement()


def sender_bot(bots: BotCache, sender: str | None, service_sid: str | None) -> Bot | None:
    """The bot that sent a message: the one with its Messaging Service, else with its From number."""
    # A value no bot can have is no bot's, without a lookup (a NUL would not even reach the database).
    bot = bots.by_service(service_sid) if service_sid and is_service_sid(service_sid) else None
    if bot is None and sender and is_e164(sender):
        bot = bots.by_number(sender)
    return bot


def _store(bot: Bot, message_sid: str, status: str, code: int | None, recipient: str, sender: str) -> str | None:
    """Record the status, or None when the SID is another bot's; a 21610 ("replied STOP") also opts the
    recipient out, as the worker does for a 21610 it is answered: of the bot's service when it has
    one, else of the number the message went from."""
    engine = deps.get_engine()
    with transaction(engine) as connection:
        owner = messagelog.sender_of(connection, message_sid)
        # A SID never seen is recorded for the caller: a callback can overtake the worker's own write.
        if owner is not None and owner != bot.id:
            return None
        current = messagelog.record_delivery(connection, message_sid, bot.id, status, code)
    news.publish(deps.get_redis(), bot.id, recipient)
    if code is not None and action_for(None, code) is Action.OPTED_OUT and (sender or bot.messaging_service_sid):
        optout.opt_out(engine, deps.get_redis(), bot.opt_out_key(sender), recipient)
    return current


def _resend_later(bot: Bot, form: MultiDict[str, str], reply_id: str, code: int) -> None:
    """Twilio accepted the reply, then its queue refused it (30001, as a Messaging Service reports
    21611): a worker sends it again after a slow backoff, once per failed MessageSid however often
    Twilio calls back. The worker reads the reply from the log, which may trail this callback."""
    redis = deps.get_redis()
    if not redis.set(keys.seen(bot.account_sid, "resend-" + form["MessageSid"]), "1", nx=True, ex=DEDUPE_TTL):
        return
    _, attempt = resend_attempt(reply_id)
    delay = backoff(Action.RETRY_SLOWLY, attempt) if attempt <= conversations.MAX_RESENDS else 0.0
    request_resend(deps.get_broker(), bot.id, reply_id, form.get("From"), code, int(delay * 1000))
    log.info("status.resend_requested", bot_id=bot.id, reply_id=reply_id, code=code, attempt=attempt,
             delay=round(delay, 3))


def _error_code(raw: str | None) -> int | None:
    """Twilio's codes are five digits; anything else is noise, not a reason to refuse the callback."""
    # int() would also read fullwidth or Arabic-Indic digits, which Twilio never sends.
    if not raw or not (raw.isascii() and raw.isdigit()):
        return None
    code = int(raw)
    return code if 0 < code < 1_000_000 else None
