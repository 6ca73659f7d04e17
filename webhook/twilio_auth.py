"""What the routes Twilio calls share: verifying that a request is Twilio's, for this bot, and answering it."""

from __future__ import annotations

from collections.abc import Mapping

from flask import Blueprint, Request, Response, request
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.twiml.messaging_response import MessagingResponse
from werkzeug.exceptions import HTTPException

from shared.bots import Bot
from shared.logging import get_logger

log = get_logger(__name__)

# Why a request failed verification; also the `reason` label of the rejection metrics.
BAD_SIGNATURE = "bad_signature"
MISSING_SIGNATURE = "missing_signature"
WRONG_ACCOUNT = "wrong_account"

# An empty <Response/> makes Twilio send nothing back; built once, it never changes.
EMPTY_TWIML = str(MessagingResponse())


def signed_url(request: Request, public_url: str | None) -> str:
    """The URL Twilio called, which is what it signed (the fragment never reaches us, and is not signed).

    With PUBLIC_URL set, a proxy or tunnel in front of us cannot change it; otherwise ProxyFix has
    already rebuilt request.url from X-Forwarded-Proto/Host, because TLS ends at Heroku's router.
    """
    if not public_url:
        return request.url
    query = request.query_string.decode("latin-1")
    return public_url + request.path + ("?" + query if query else "")


def is_signed(auth_token: str, url: str, params: Mapping[str, str], signature: str,
              signature_settings: str | None = None) -> bool:
    """Twilio's own check: an HMAC over the URL and every parameter, known to us or not."""
    algorithm = get_signature_algorithm(signature_settings)
    return RequestValidator(auth_token).validate(url, params, signature, algorithm=algorithm)


def rejection(request: Request, bot: Bot, public_url: str | None) -> str | None:
    """None when `request` is signed with the bot's auth token and names its account; else the reason."""
    signature = request.headers.get(SIGNATURE_HEADER)
    if not signature:
        return MISSING_SIGNATURE
    url = signed_url(request, public_url)
    if not is_signed(bot.auth_token, url, request.form, signature, request.headers.get(SIGNATURE_SETTINGS_HEADER)):
        return BAD_SIGNATURE
    # Checked after the signature, so an unsigned caller learns nothing about which account a number is on.
    if request.form.get("AccountSid") != bot.account_sid:
        return WRONG_ACCOUNT
    return None


def acknowledgement() -> Response:
    """200 with empty TwiML: Twilio's console reports an empty body or a missing Content-Type as errors."""
    return Response(EMPTY_TWIML, status=200, content_type="text/xml")


def refusal(status: int, reason: str) -> Response:
    """A short plain answer: Twilio only looks at the status, and a person reading its debugger sees why."""
    return Response(reason, status=status, content_type="text/plain; charset=utf-8")


def guard(blueprint: Blueprint) -> None:
    """Nothing a caller sends to a Twilio route may produce a 500 or a traceback."""

    @blueprint.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        return refusal(error.code or 400, error.name)

    @blueprint.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        # Our fault, not the caller's: 503 makes Twilio retry or use the number's fallback URL.
        log.exception("twilio_route.failed", path=request.path)
        return refusal(503, "Service Unavailable")
