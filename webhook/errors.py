"""Errors answered as clean JSON (or TwiML-free text for Twilio's routes), never a traceback."""

from __future__ import annotations

from flask import Flask, jsonify, request
from sqlalchemy.exc import OperationalError, TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from shared.db import PROBE_SECONDS, DatabaseUnavailable
from shared.logging import get_logger

log = get_logger(__name__)


def failure(message: str, errors: object = None) -> dict[str, object]:
    """Mammut's TaskResult failure shape, as a dict (for an answer that is also kept, say)."""
    body: dict[str, object] = {"status": "Failed", "message": message}
    if errors:
        body["errors"] = errors
    return body


def failed(message: str, status: int, errors: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    """Mammut's TaskResult failure shape, answered."""
    return jsonify(failure(message, errors)), status


def init_app(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):  # type: ignore[no-untyped-def]
        response, status = failed(error.description or error.name, error.code or 500)
        # A 405's Allow header (RFC 9110) and any other header werkzeug set for the error.
        response.headers.extend((name, value) for name, value in error.get_headers() if name != "Content-Type")
        return response, status

    # The registry, the log and the console need the database; Twilio's webhook does not.
    @app.errorhandler(DatabaseUnavailable)
    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    def database_unreachable(error: Exception):  # type: ignore[no-untyped-def]
        log.warning("request.database_unreachable", path=request.path, error=error.__class__.__name__)
        response, status = failed("the database is unreachable: registry changes, the message log and the console "
                                  "are unavailable until it returns (texts are still accepted and answered)", 503)
        response.headers["Retry-After"] = str(int(PROBE_SECONDS))
        return response, status

    @app.errorhandler(Exception)
    def unexpected(error: Exception):  # type: ignore[no-untyped-def]
        log.exception("request.failed", path=request.path)
        return failed("internal error; the event was logged", 500)
