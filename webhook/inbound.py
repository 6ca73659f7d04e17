"""Twilio's inbound SMS webhook: verify, deduplicate, enqueue and acknowledge, in milliseconds.

All bot work happens in the workers, so a slow bot can never make Twilio time out (error 11200).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.datastructures import MultiDict

from shared.bots import Bot, BotCache, is_service_sid
from shared.conversations import accept_inbound
from shared.logging import get_logger
from shared.optout import classify
from shared.phone import is_e164, is_sender
from shared.text import plain
from webhook import deps, twilio_auth
from webhook.twilio_auth import acknowledgement

log = get_logger(__name__)
bp = Blueprint("inbound", __name__)
twilio_auth.guard(bp)

route = twilio_auth.TwilioRoute("inbound", required=("From", "To", "MessageSid"), metric="sms_inbound")
# Twilio attaches at most 10 media to one message; NumMedia is the caller's word, so it is capped.
MAX_MEDIA = 10
LOCATION_FIELDS = tuple(f"{side}{part}" for side in ("From", "To") for part in ("City", "State", "Zip", "Country"))
BAD_SENDER = "bad_sender"
IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"
# Both spellings are served: a redirect from one to the other would break Twilio's signature.
PATHS = ("/channels/sms/", "/channels/sms")


def receive() -> Response:
    return route.handle(_receive)


for _path in PATHS:
    bp.add_url_rule(_path, view_func=receive, methods=["POST"])


def _receive(form: MultiDict[str, str]) -> Response:
    resources = deps.resources()
    bot = addressee(resources.bots, form["To"], form.get("MessagingServiceSid"))
    if bot is None:
        return route.reject(404, "unknown_number", message_sid=form["MessageSid"], to=form["To"])
    reason = twilio_auth.rejection(request, bot, resources.settings.public_url)
    if reason is not None:
        return route.reject(403, reason, message_sid=form["MessageSid"], bot_id=bot.id)
    # Signed is not enough: the answer would go back to From through the Twilio API, billed to the bot.
    if not is_sender(form["From"]):
        return route.reject(400, BAD_SENDER, message_sid=form["MessageSid"], bot_id=bot.id, from_=form["From"])
    take(resources.redis, bot, form.to_dict(), request.headers.get(IDEMPOTENCY_HEADER))
    return acknowledgement()


def take(redis: Any, bot: Bot, fields: Mapping[str, str], idempotency_token: str | None) -> None:
    """Store a verified text (the first value of each field) for its bot's workers, or recognise it
    as a retry, and log which."""
    message = inbound_message(fields, bot)
    # One round trip: dedupe, record opt-out, queue on the conversation and wake a worker (one Lua step).
    is_new = accept_inbound(redis, message, idempotency_token=idempotency_token,
                            account_sid=bot.account_sid, remember_texted=bot.pooled,
                            opt_out_key=bot.opt_out_key(message["to"]))
    # The conversation id embeds the sender's number; the log processor masks it like from_.
    log.info("inbound.received" if is_new else "inbound.duplicate", message_sid=message["sid"], bot_id=bot.id,
             conversation=f"{bot.id}:{message['sender']}", from_=message["sender"], kind=message["event"])


def addressee(bots: BotCache, to: str, service_sid: str | None) -> Bot | None:
    """The bot a message is for: the one with the number texted, else the one with its Messaging
    Service (a pool number the registry does not list). From the cache: no query per message."""
    # A value no bot can have is no bot's, without a lookup (a NUL would not even reach the database).
    if not is_e164(to):
        return None
    bot = bots.by_number(to)
    if bot is None and service_sid and is_service_sid(service_sid):
        bot = bots.by_service(service_sid)
    return bot


def inbound_message(form: Mapping[str, str], bot: Bot) -> dict[str, Any]:
    """Everything the worker and the engine need from Twilio's form, as shared.conversations.INBOUND.

    `form` is a plain dict of the form's first values (every Twilio field has one): a MultiDict
    raises and catches an HTTPException inside get() for each absent field, and most are absent.
    """
    body = plain(form.get("Body", ""))
    opt_out_type = form.get("OptOutType") or None
    return {
        "sid": form["MessageSid"],
        "bot_id": bot.id,
        "sender": form["From"],
        "to": form["To"],  # the number texted: the bot's main one, another of its own, or one of its service's
        "body": body,
        "media": _media(form),
        "num_segments": _count(form.get("NumSegments"), default=1),
        "location": {name: form[name] for name in LOCATION_FIELDS if form.get(name)},
        "opt_out_type": opt_out_type,
        "event": classify(body, opt_out_type, bot.keywords.event_of),
        "received_at": time.time(),  # also its place in the pending set
    }


def _media(form: Mapping[str, str]) -> list[dict[str, str | None]]:
    count = min(_count(form.get("NumMedia"), default=0), MAX_MEDIA)
    return [
        {"url": form[f"MediaUrl{n}"], "content_type": form.get(f"MediaContentType{n}") or None}
        for n in range(count)
        if form.get(f"MediaUrl{n}")
    ]


def _count(raw: str | None, default: int) -> int:
    """A non-negative count from the form; anything else is the caller's mistake, not a 500."""
    # ASCII only: int() would also read "５" or "٥" as 5.
    if not raw or not raw.isascii():
        return default
    try:
        return max(int(raw), 0)
    except ValueError:
        return default
