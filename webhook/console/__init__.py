"""The operator console at /console/: server-rendered pages where people answer, watch and fix
their bots' conversations (pages.py), sign in (auth.py), and see changes live (live.py).

Every action calls the functions the REST API calls (webhook.operator, webhook.handoffs,
webhook.deadletters, webhook.registry); who may do what is shared.access's, as for API keys.
Pages work by plain reload; a little JavaScript (static/console.js) saves the reload.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Flask, request
from flask_babel import Babel

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static")
LANGUAGES = ("en", "es")
TRANSLATIONS = Path(__file__).resolve().parent / "translations"
# Pages load nothing from elsewhere: scripts, styles and connections are this service's own.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' https: data:; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'")


def locale() -> str:
    return request.accept_languages.best_match(LANGUAGES) or LANGUAGES[0]


def init_app(app: Flask) -> None:
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", str(TRANSLATIONS))
    Babel(app, locale_selector=locale)
    from webhook.console import auth, live, pages  # noqa: F401 - their routes join bp

    app.register_blueprint(bp)


@bp.after_request
def security_headers(response):  # type: ignore[no-untyped-def]
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["Vary"] = "Accept-Language, Cookie"
    return response


def is_console(endpoint: str | None) -> bool:
    return bool(endpoint) and endpoint.startswith(bp.name + ".")  # type: ignore[union-attr]
