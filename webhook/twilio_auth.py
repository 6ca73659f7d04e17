"""What the routes Twilio calls share: verifying that a request is Twilio's, for this bot, and answering it."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis as redis_lib
from sqlalchemy.exc import SQLAlchemyError
from flask import Blueprint, Request, Response, request
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.twiml.messaging_response import MessagingResponse
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from shared import metrics
from shared.bots import Bot
from shared.logging import get_logger
from webhook import deps

log = get_logger(__name__)

# Why a request failed verification; also the `reason` label of the rejection metrics.
BAD_SIGNATURE = "bad_signature"
MISSING_SIGNATURE = "missing_signature"
WRONG_ACCOUNT = "wrong_account"

# An empty <Response/> makes Twilio send nothing back; built once, it never changes.
EMPTY_TWIML = str(MessagingResponse())
# The 503 bodies: Redis unreachable (a deliberate refusal) vs. an unexpected exception (a bug).
UNAVAILABLE = "Service Unavailable"
INTERNAL_ERROR = "Internal Error"


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
    """Twilio's own check: an HMAC over the URL and every parameter, known to us or not.

    RequestValidator.validate signs every request twice, over the URL with and without its port
    (Twilio's back end is inconsistent about it). The URL exactly as it was called is tried
    first, alone; validate() judges whatever that does not match.
    """
    algorithm = get_signature_algorithm(signature_settings)
    validator = RequestValidator(auth_token)
    if isinstance(params, MultiDict):
        params = _AllValues(params)
    try:
        expected = validator.compute_signature(url, params, algorithm)
    except ValueError:  # an algorithm this twilio release does not know: validate() logs and refuses it
        expected = ""
    if expected and hmac.compare_digest(expected.encode(), signature.encode()):
        return True
    return validator.validate(url, params, signature, algorithm=algorithm)


class _AllValues(Mapping[str, str]):
    """A werkzeug form as twilio's RequestValidator reads every value of a field fastest: it asks
    for getall() first, and a MultiDict, which has getlist() instead, costs it an AttributeError
    raised and caught per field (a third of the signature check)."""

    __slots__ = ("form",)

    def __init__(self, form: MultiDict[str, str]) -> None:
        self.form = form

    def __getitem__(self, name: str) -> str:
        return self.form[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.form)

    def __len__(self) -> int:
        return len(self.form)

    def getall(self, name: str) -> list[str]:
        return self.form.getlist(name)


def rejection(request: Request, bot: Bot, public_url: str | None) -> str | None:
    """None when `request` is signed with the bot's auth token and names its account; else the reason."""
    return rejection_of(bot, signed_url(request, public_url), request.form, request.headers.get(SIGNATURE_HEADER),
                        request.headers.get(SIGNATURE_SETTINGS_HEADER))


def rejection_of(bot: Bot, url: str, form: Mapping[str, str], signature: str | None,
                 signature_settings: str | None = None) -> str | None:
    """rejection(), given what it reads of the request: the URL Twilio signed, the form and the two headers."""
    if not signature:
        return MISSING_SIGNATURE
    if not is_signed(bot.auth_token, url, form, signature, signature_settings):
        return BAD_SIGNATURE
    # Checked after the signature, so an unsigned caller learns nothing about which account a number is on.
    if (form.get("AccountSid") or "").lower() != bot.account_sid.lower():  # a SID's hex has no case
        return WRONG_ACCOUNT
    return None


def acknowledgement() -> Response:
    """200 with empty TwiML: Twilio's console reports an empty body or a missing Content-Type as errors."""
    return Response(EMPTY_TWIML, status=200, content_type="text/xml")


def refusal(status: int, reason: str) -> Response:
    """A short plain answer: Twilio only looks at the status, and a person reading its debugger sees why."""
    return Response(reason, status=status, content_type="text/plain; charset=utf-8")


class TwilioRoute:
    """The shape every route Twilio calls shares: 413, 400 for missing fields, the route's own work,
    and 503 (never an acknowledgement) when Redis cannot store what Twilio sent, or the database
    cannot say whose number it is."""

    def __init__(self, name: str, required: tuple[str, ...], metric: str,
                 labels: Callable[[str], dict[str, str]] | None = None) -> None:
        self.name, self.required, self.metric = name, required, metric
        # A rejection's metric labels, from its reason.
        self.labels = labels or (lambda reason: {"result": "rejected", "reason": reason})

    def handle(self, work: Callable[[MultiDict[str, str]], Response]) -> Response:
        try:
            form = request.form
        except RequestEntityTooLarge:
            return self.reject(413, "too_large")
        missing = [name for name in self.required if not form.get(name)]
        if missing:
            return self.reject(400, "missing_fields", message_sid=form.get("MessageSid"), missing=missing)
        # Unsigned is refused before any lookup: it costs nothing, and says nothing about which numbers exist.
        if not request.headers.get(SIGNATURE_HEADER):
            return self.reject(403, MISSING_SIGNATURE, message_sid=form["MessageSid"])
        try:
            return work(form)
        except (redis_lib.RedisError, SQLAlchemyError) as error:
            # Redis, or the database for a bot not in the cache, is away: Twilio retries a 5xx (or
            # calls the number's fallback URL), so what it sent is not lost.
            log.error(f"{self.name}.unavailable", message_sid=form["MessageSid"], error=error.__class__.__name__)
            return refusal(503, UNAVAILABLE)

    def reject(self, status: int, reason: str, **context: Any) -> Response:
        log.warning(f"{self.name}.rejected", http_status=status, reason=reason, **context)
        try:
            metrics.incr(deps.get_redis(), self.metric, **self.labels(reason))
        except redis_lib.RedisError:
            pass  # the rejection stands; only its count is lost
        return refusal(status, reason)


def guard(blueprint: Blueprint) -> None:
    """Nothing a caller sends to a Twilio route may produce a 500 or a traceback."""

    @blueprint.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        response = refusal(error.code or 400, error.name)
        response.headers.extend((name, value) for name, value in error.get_headers() if name != "Content-Type")
        return response

    @blueprint.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        # Our fault, not the caller's: 503 makes Twilio retry or use the number's fallback URL.
        log.exception("twilio_route.crashed", path=request.path)
        return refusal(503, INTERNAL_ERROR)
