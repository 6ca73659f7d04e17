"""Liveness and readiness, for the platform's health checks."""

from __future__ import annotations

import redis as redis_lib
from flask import Blueprint, jsonify

from webhook.deps import get_redis

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    """The process is up."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    """Redis answers: without it nothing can be accepted, so stop sending traffic here."""
    try:
        get_redis().ping()
    except redis_lib.RedisError as error:
        return jsonify(status="unavailable", reason=f"redis: {error.__class__.__name__}"), 503
    return jsonify(status="ok")
