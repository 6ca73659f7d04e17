"""The floor the webhook is measured against: the least any correct receiver must do.

Validate the signature with twilio's RequestValidator, one dramatiq enqueue on the same Redis, empty
TwiML. No bot lookup, no dedupe, no logging: whatever the real receiver adds shows up as the gap.
Served by bench/webhook.py under the same gunicorn settings as the real app.
"""

from __future__ import annotations

import os

from flask import Flask, Response, request
from twilio.request_validator import RequestValidator
from twilio.twiml.messaging_response import MessagingResponse

from shared.tasks import kick_conversation, make_broker

EMPTY_TWIML = str(MessagingResponse())


def create_app() -> Flask:
    app = Flask(__name__)
    token = os.environ["BENCH_AUTH_TOKEN"]
    broker = make_broker(os.environ["REDIS_URL"])

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok", content_type="text/plain")

    @app.post("/channels/sms/")
    def receive() -> Response:
        if not RequestValidator(token).validate(request.url, request.form, request.headers.get("X-Twilio-Signature", "")):
            return Response("bad signature", status=403)
        kick_conversation(f"floor:{request.form['From']}", broker=broker)
        return Response(EMPTY_TWIML, content_type="text/xml")

    return app
