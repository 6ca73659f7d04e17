"""Twilio's inbound webhook in its everyday shape, answered without Flask (issue 28).

Nearly every request the web process serves is one text: a urlencoded form of a few hundred bytes,
signed by the bot it is for. Flask's request context and routing, werkzeug's Request and its form
machinery cost a third of the CPU of such a request (`python bench/webhook_cost.py`). This WSGI
middleware answers exactly those requests itself: with the route's own steps (webhook.inbound's
addressee and take, twilio_auth.rejection_of, is_sender), on the values werkzeug would have given the
route (parse_qsl's reading of the same bytes, the URL from Flask's own request class), and
the route's answers when Redis or the code fails. Everything else goes to Flask untouched, and so
does a text it would refuse (an unknown number, a bad signature, a missing field, a sender that is
not a phone), with its body put back: every refusal has one author, its log line and its metric.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

import redis as redis_lib
import werkzeug.urls  # noqa: F401 - registers the "werkzeug.url_quote" error handler the form is read with
from flask import Flask
from sqlalchemy.exc import SQLAlchemyError

from shared.logging import get_logger
from shared.phone import is_sender
from webhook import inbound, twilio_auth

log = get_logger("webhook.inbound")

PATHS = frozenset(inbound.PATHS)
# Twilio's spelling and the one common variant; any other Content-Type is werkzeug's to interpret.
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=utf-8"})
# The route's acknowledgement, taken apart once: every text answered here gets its bytes.
_ACKNOWLEDGEMENT = twilio_auth.acknowledgement()
ACKNOWLEDGEMENT = _ACKNOWLEDGEMENT.get_data()
ACKNOWLEDGEMENT_HEADERS = tuple(_ACKNOWLEDGEMENT.headers.items())


def _wsgi_name(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


# The request headers the route reads, as WSGI names them.
SIGNATURE = _wsgi_name(twilio_auth.SIGNATURE_HEADER)
SIGNATURE_SETTINGS = _wsgi_name(twilio_auth.SIGNATURE_SETTINGS_HEADER)
IDEMPOTENCY_TOKEN = _wsgi_name(inbound.IDEMPOTENCY_HEADER)
# The URLs Twilio signed, by the parts of the request they are built from: one or two in practice
# (a Host per deployment); a caller inventing Host headers only makes it start over.
URLS_KEPT = 64


class FastInbound:
    """WSGI middleware in front of the Flask app (inside ProxyFix, so the environ is what Flask sees)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], flask_app: Flask, limit: int) -> None:
        self.app = app
        self.flask_app = flask_app
        self.limit = limit
        self._urls: dict[tuple[Any, ...], str] = {}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") not in PATHS:
            return self.app(environ, start_response)
        body = self._body(environ)
        if body is None:
            return self.app(environ, start_response)
        form: Form | None = None
        try:
            form = _form(body)
            taken = form is not None and self._take(environ, form)
        except (redis_lib.RedisError, SQLAlchemyError) as error:
            # As TwilioRoute.handle: Twilio retries a 5xx (or calls the fallback URL), so nothing is lost.
            log.error("inbound.unavailable", message_sid=form.get("MessageSid") if form else None,
                      error=error.__class__.__name__)
            return twilio_auth.refusal(503, twilio_auth.UNAVAILABLE)(environ, start_response)
        except Exception:
            # As twilio_auth.guard: our fault, not the caller's, and never a traceback in the answer.
            log.exception("twilio_route.crashed", path=environ.get("PATH_INFO"))
            return twilio_auth.refusal(503, twilio_auth.INTERNAL_ERROR)(environ, start_response)
        if not taken:
            environ["wsgi.input"] = io.BytesIO(body)  # the route reads it again, and answers
            return self.app(environ, start_response)
        start_response("200 OK", list(ACKNOWLEDGEMENT_HEADERS))
        return [ACKNOWLEDGEMENT]

    def _body(self, environ: dict[str, Any]) -> bytes | None:
        """The whole body of a form the route would read as this does, else None (nothing read)."""
        if environ.get("CONTENT_TYPE", "").lower() not in FORM_TYPES or "HTTP_TRANSFER_ENCODING" in environ:
            return None
        length = environ.get("CONTENT_LENGTH") or ""
        if not (length.isascii() and length.isdigit()) or int(length) > self.limit:
            return None  # werkzeug's 411/413 and its other judgements stay werkzeug's
        return environ["wsgi.input"].read(int(length))

    def _take(self, environ: dict[str, Any], form: Form) -> bool:
        """inbound._receive's steps; False, with nothing stored, where the route would refuse."""
        if not all(form.get(name) for name in inbound.route.required):
            return False
        signature = environ.get(SIGNATURE)
        if not signature:
            return False
        resources = self.flask_app.extensions["mammut"]
        bot = inbound.addressee(resources.bots, form["To"], form.get("MessagingServiceSid"))
        if bot is None:
            return False
        url = self._signed_url(environ, resources.settings.public_url)
        if twilio_auth.rejection_of(bot, url, form, signature,
                                    environ.get(SIGNATURE_SETTINGS)) is not None:
            return False
        if not is_sender(form["From"]):
            return False
        inbound.take(resources.redis, bot, form, environ.get(IDEMPOTENCY_TOKEN))
        return True

    def _signed_url(self, environ: dict[str, Any], public_url: str | None) -> str:
        """twilio_auth.signed_url's answer for this request."""
        query = environ.get("QUERY_STRING", "")
        if public_url:
            return public_url + environ["PATH_INFO"] + ("?" + query if query else "")
        key = (environ.get("wsgi.url_scheme"), environ.get("HTTP_HOST"), environ.get("SERVER_NAME"),
               environ.get("SERVER_PORT"), environ.get("SCRIPT_NAME"), environ["PATH_INFO"], query)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= URLS_KEPT:
                self._urls.clear()
            url = self._urls[key] = self.flask_app.request_class(environ).url
        return url


class Form(dict[str, str]):
    """A urlencoded form as the route's steps read it: each field's first value by name (what
    werkzeug's MultiDict.get and to_dict give), and all of a field's values by getall (what twilio's
    RequestValidator signs; without getall it would raise and catch two AttributeErrors per field)."""

    __slots__ = ("repeated",)

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        self.repeated: dict[str, list[str]] = {}  # every value of a field sent more than once
        for name, value in pairs:
            if name not in self:
                self[name] = value
            else:
                self.repeated.setdefault(name, [self[name]]).append(value)

    def getall(self, name: str) -> list[str]:
        return self.repeated.get(name) or [self[name]]

    def to_dict(self) -> dict[str, str]:
        return dict(self)


def _form(body: bytes) -> Form | None:
    """The form werkzeug's parser reads (formparser._parse_urlencoded), or None where it would read
    none (a body that is not UTF-8: the route answers that one)."""
    try:
        return Form(pairs(body.decode()))
    except ValueError:
        return None


def pairs(query: str) -> list[tuple[str, str]]:
    """parse_qsl(query, keep_blank_values=True, errors="werkzeug.url_quote"), werkzeug's call, in
    two thirds of its time: a piece without "%" needs no unquoting (tests/test_fast_inbound.py)."""
    found = []
    for piece in query.replace("+", " ").split("&"):
        if not piece:
            continue
        name, _, value = piece.partition("=")
        if "%" in piece:
            name = unquote(name, errors="werkzeug.url_quote")
            value = unquote(value, errors="werkzeug.url_quote")
        found.append((name, value))
    return found
