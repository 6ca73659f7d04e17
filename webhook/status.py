"""Twilio's delivery status callbacks for the messages the workers sent.

The workers set StatusCallback to PUBLIC_URL/channels/sms/status on each send; callbacks arrive out
of order, and shared.messagelog keeps a status from ever moving backwards.
"""

from __future__ import annotations

from flask import Blueprint, Response, request
from werkzeug.datastructures import MultiDict

from shared import messagelog, metrics, optout
from shared.logging import get_logger
from shared.twilio_errors import Action, action_for
from webhook import deps, twilio_auth
from webhook.twilio_auth import acknowledgement

log = get_logger(__name__)
bp = Blueprint("status", __name__)
twilio_auth.guard(bp)
route = twilio_auth.TwilioRoute(
    "status", required=("MessageSid", "MessageStatus", "From", "To"), metric="sms_status_callbacks",
    labels=lambda reason: {"status": "rejected"},
)


@bp.post("/channels/sms/status")
@bp.post("/channels/sms/status/")
def status_callback() -> Response:
    return route.handle(_record)


def _record(form: MultiDict[str, str]) -> Response:
    # The message was sent from the bot's number, so the bot is found by From.
    bot = deps.get_bots().by_number(form["From"])
    if bot is None:
        return route.reject(404, "unknown_number", message_sid=form["MessageSid"], number=form["From"])
    reason = twilio_auth.rejection(request, bot, deps.get_settings().public_url)
    if reason is not None:
        return route.reject(403, reason, message_sid=form["MessageSid"], bot_id=bot.id)
    redis = deps.get_redis()
    status, code = form["MessageStatus"], _error_code(form.get("ErrorCode"))
    current = messagelog.record_status(redis, form["MessageSid"], status, code)
    if code is not None and action_for(None, code) is Action.OPTED_OUT:
        optout.opt_out(redis, bot.number, form["To"])
    # Only Twilio's own statuses become labels: a caller must not be able to invent series.
    metrics.incr(redis, "sms_status_callbacks", status=status if status in messagelog.STATUS_RANK else "other")
    log.info("status.callback", message_sid=form["MessageSid"], bot_id=bot.id, status=status, current=current,
             error_code=code, recipient=form["To"])
    return acknowledgement()


def _error_code(raw: str | None) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None
