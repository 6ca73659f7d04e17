"""The web process: Twilio's webhook receiver and the bot registry API."""

from __future__ import annotations

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from shared.logging import configure_logging
from shared.settings import Settings, get_settings
from webhook import deps
from webhook.chunked import ChunkedBodyLimit
from webhook.fastinbound import FastInbound

MAX_BODY_BYTES = 64 * 1024


def create_app(settings: Settings | None = None) -> Flask:
    """The only place the app is wired: settings, Redis, the bot store, the broker, the routes."""
    settings = (settings or get_settings()).checked()
    configure_logging(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    deps.init_app(app, settings)
    # TLS ends at Heroku's router: trust its X-Forwarded-Proto/Host so request.url is the URL Twilio signed.
    # Texts, nearly all the traffic, are answered without Flask's machinery (webhook/fastinbound.py).
    app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
        ChunkedBodyLimit(FastInbound(app.wsgi_app, app, MAX_BODY_BYTES), MAX_BODY_BYTES), x_proto=1, x_host=1)

    from webhook import apikeys, deadletters, errors, health, inbound, metrics, openapi, registry, replies, status

    errors.init_app(app)
    for module in (health, metrics, openapi, inbound, status, replies, registry, apikeys, deadletters):
        app.register_blueprint(module.bp)
    from webhook import console

    console.init_app(app)
    return app
