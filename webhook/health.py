"""Liveness and readiness, for the platform's health checks."""

from __future__ import annotations

import redis as redis_lib
from flask import Blueprint, jsonify

from shared import keys
from webhook.deps import get_redis

# The probe's key lasts just long enough to be written: it holds nothing.
READY_PROBE_MS = 1000

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    """The process is up."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    """Redis takes a write: without that nothing can be accepted, so stop sending traffic here. A
    Redis that answers but refuses writes (full under maxmemory, a read-only replica) is not ready."""
    try:
        get_redis().set(keys.READY_PROBE, "1", px=READY_PROBE_MS)
    except redis_lib.RedisError as error:
        return jsonify(status="unavailable", reason=f"redis: {error.__class__.__name__}"), 503
    return jsonify(status="ok")
