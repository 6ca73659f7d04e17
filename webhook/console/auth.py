"""Signing in to the console: argon2 passwords (shared.operators), sessions kept in Redis
(shared.sessions) behind an HttpOnly, SameSite cookie (Secure over https), sign-ins rate-limited per
account and per address, and a CSRF token checked on every request that changes anything.
"""

from __future__ import annotations

import hmac
import secrets

from flask import abort, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_babel import gettext as _
from werkzeug.wrappers import Response

from shared import operators, sessions
from shared.access import Principal
from shared.logging import get_logger
from webhook.console import bp
from webhook.deps import get_engine, get_redis

log = get_logger(__name__)

COOKIE = "mammut_console"
SIGN_IN_COOKIE = "mammut_console_sign_in"  # the sign-in form's CSRF token, before there is a session
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
_OPEN = frozenset({"console.sign_in", "console.static"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def principal() -> Principal:
    return g.console_principal


def csrf_token() -> str:
    return g.console_csrf


@bp.before_request
def require_session() -> ResponseReturnValue | None:
    """Every page but sign-in needs a live session; every change needs the session's CSRF token."""
    if request.endpoint in _OPEN:
        return None
    session = sessions.find(get_redis(), request.cookies.get(COOKIE, ""))
    operator = None
    if session is not None:
        with get_engine().connect() as connection:
            operator = operators.by_id(connection, session.operator_id)  # removed: signed out at once
    if session is None or operator is None:
        if request.method in _SAFE_METHODS and request.endpoint != "console.live":
            return redirect(url_for("console.sign_in", next=request.full_path if request.args else request.path))
        abort(401)
    g.console_operator, g.console_principal, g.console_csrf = operator, operator.principal(), session.csrf
    if request.method not in _SAFE_METHODS and not _csrf_ok(session.csrf):
        log.warning("console.csrf_refused", operator=operator.email, path=request.path)
        abort(403, _("This form has expired or came from another site. Reload the page and try again."))
    return None


def _csrf_ok(expected: str) -> bool:
    given = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    origin = request.headers.get("Origin")
    if origin is not None and origin != request.host_url.rstrip("/"):
        return False  # a browser says which site sent the form: only ours may
    return hmac.compare_digest(given.encode(), expected.encode())


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> ResponseReturnValue:
    """The sign-in form; a POST checks the password, within the rate limits."""
    if request.method == "GET":
        return _sign_in_page(None, 200)
    form_token = request.cookies.get(SIGN_IN_COOKIE, "")
    if not form_token or not hmac.compare_digest(form_token.encode(), request.form.get(CSRF_FIELD, "").encode()):
        return _sign_in_page(_("This form has expired. Please sign in again."), 403)
    email = request.form.get("email", "").strip().lower()[:320]
    address = _address()
    redis = get_redis()
    if sessions.sign_in_blocked(redis, email, address):
        log.warning("console.sign_in_blocked", operator=email, address=address)
        return _sign_in_page(_("Too many failed sign-ins. Wait 15 minutes and try again."), 429)
    with get_engine().begin() as connection:
        operator = operators.authenticate(connection, email, request.form.get("password", ""))
    if operator is None:
        sessions.sign_in_failed(redis, email, address)
        log.info("console.sign_in_failed", operator=email, address=address)
        return _sign_in_page(_("Wrong email or password."), 401)
    sessions.sign_in_succeeded(redis, email)
    log.info("console.signed_in", operator=operator.email)
    response = redirect(_next_page())
    response.set_cookie(COOKIE, sessions.start(redis, operator.id), max_age=sessions.SESSION_SECONDS,
                        path=bp.url_prefix, secure=request.is_secure, httponly=True, samesite="Lax")
    response.delete_cookie(SIGN_IN_COOKIE, path=bp.url_prefix)
    return response


@bp.post("/sign-out")
def sign_out() -> ResponseReturnValue:
    """End every session of this operator, on every device."""
    ended = sessions.end_all(get_redis(), g.console_operator.id)
    log.info("console.signed_out", operator=g.console_operator.email, sessions=ended)
    response = redirect(url_for("console.sign_in"))
    response.delete_cookie(COOKIE, path=bp.url_prefix)
    return response


def _address() -> str:
    """The browser's address: the last X-Forwarded-For entry is the one Heroku's router added (the
    web process only ever sees the router's own address); without one, the peer's."""
    forwarded = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
    return forwarded or request.remote_addr or "unknown"


def _sign_in_page(problem: str | None, status: int) -> Response:
    token = secrets.token_urlsafe(32)
    page = render_template("sign_in.html", problem=problem, csrf=token, next=request.values.get("next", ""))
    response = Response(page, status=status, content_type="text/html; charset=utf-8")
    response.set_cookie(SIGN_IN_COOKIE, token, max_age=3600, path=bp.url_prefix, secure=request.is_secure,
                        httponly=True, samesite="Strict")
    return response


def _next_page() -> str:
    """Where the form was going, if it is a console page (never another site)."""
    wanted = request.form.get("next", "")
    if wanted.startswith(bp.url_prefix + "/") and not wanted.startswith("//") and "\\" not in wanted:
        return wanted
    return url_for("console.inbox")
