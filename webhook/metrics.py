"""GET /metrics: Prometheus's text format, for the whole service, served by the web process.

Every process (a worker dyno has no open port) records its counters in Redis through
shared.metrics; this endpoint renders them with the queue depths read at scrape time.

When ADMIN_API_TOKEN is set (always, outside development) a scraper must send it as a bearer
token (Prometheus: `authorization: {credentials: ...}`), since the counts reveal traffic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis as redis_lib
from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from shared import keys
from shared.db import database_up
from shared.metrics import TALLY, RedisCollector
from shared.tasks import CONVERSATIONS_QUEUE, NAMESPACE, OUTBOUND_QUEUE, waiting_key
from webhook import access
from webhook.deps import get_engine, get_redis, get_settings

bp = Blueprint("metrics", __name__)

# Each queue's waiting messages are a Redis list (shared.tasks.waiting_key); delayed ones (retries,
# paced sends) wait in dramatiq's ".DQ" queue, dead letters in its ".XQ" sorted set.
_QUEUES = (CONVERSATIONS_QUEUE, f"{CONVERSATIONS_QUEUE}.DQ", OUTBOUND_QUEUE, f"{OUTBOUND_QUEUE}.DQ")
_DEAD_LETTER_QUEUES = (CONVERSATIONS_QUEUE, OUTBOUND_QUEUE)


def queue_depths(redis: Any) -> dict[str, float]:
    pipe = redis.pipeline(transaction=False)
    for queue in _QUEUES:
        pipe.llen(waiting_key(queue))
    return {queue: float(depth) for queue, depth in zip(_QUEUES, pipe.execute())}


def dead_letters(redis: Any) -> dict[str, float]:
    pipe = redis.pipeline(transaction=False)
    for queue in _DEAD_LETTER_QUEUES:
        pipe.zcard(f"{NAMESPACE}:{queue}.XQ")
    return {queue: float(count) for queue, count in zip(_DEAD_LETTER_QUEUES, pipe.execute())}


def pending_conversations(redis: Any) -> dict[str, float]:
    return {CONVERSATIONS_QUEUE: float(redis.zcard(keys.PENDING))}


def log_backlog(redis: Any) -> dict[str, float]:
    pipe = redis.pipeline(transaction=False)
    pipe.llen(keys.LOG_OUTBOX)
    pipe.llen(keys.LOG_REFUSED)
    waiting, refused = pipe.execute()
    return {"waiting": float(waiting), "refused": float(refused)}


def scheduled_waiting(redis: Any) -> dict[str, float]:
    return {reason: float(count) for reason, count in redis.hgetall(keys.SCHEDULED_WAITING).items()}


GAUGES = {
    "sms_queue_depth": ("Messages waiting in each Dramatiq queue (.DQ: delayed, e.g. retries).", queue_depths),
    "sms_dead_letters": ("Sends that died of an unexpected error, in each Dramatiq dead-letter queue (kept 7 days; "
                         "replay with mammut-sms dlq). Replies Twilio refused are in the database.", dead_letters),
    "sms_log_backlog": ("Message-log records waiting in Redis to be written to the database (grows while the "
                        "database is unreachable), and those it refused (set aside, see the worker log).", log_backlog),
    "sms_pending_conversations": ("Conversations with inbound or outbound work outstanding.", pending_conversations),
    "sms_scheduled_waiting": ("Messages waiting in the database for their time: send-at (scheduled) or quiet-hours "
                              "(held until the recipient's quiet hours end), as the workers counted them within the "
                              "last second.", scheduled_waiting),
}


class DatabaseCollector(Collector):
    """Whether the database answers, asked at scrape time (at once 0 while this process finds it down)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "sms_database_up", "1 while the database answers; 0 while it is unreachable (texts are still accepted "
            "and answered from Redis's copies, and the log waits in sms_log_backlog).",
            value=float(database_up(self._engine)))


@bp.get("/metrics")
def metrics() -> Response:
    """The service's counters, latency histograms, queue depths and dead-letter count."""
    refusal = _refusal()
    if refusal is not None:
        return refusal
    # A registry per scrape: collecting reads Redis anyway, and nothing lingers between scrapes.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(get_redis(), gauges=GAUGES))
    registry.register(DatabaseCollector(get_engine()))
    try:
        TALLY.flush(get_redis())  # this process's counts of the last second are in the scrape too
        body = generate_latest(registry)
    except redis_lib.RedisError as error:
        return Response(f"redis unavailable: {error.__class__.__name__}\n", status=503,
                        content_type="text/plain; charset=utf-8")
    return Response(body, status=200, content_type=CONTENT_TYPE_LATEST)


def _refusal() -> Response | None:
    """401 without the admin token or an admin's API key, 403 for an operator's key (the counts span every bot)."""
    if not get_settings().admin_api_token:
        return None  # only possible in development: production refuses to start without the token
    principal = access.identify(access.bearer())
    if principal is None:
        return Response("missing or wrong bearer token (Authorization: Bearer $ADMIN_API_TOKEN)\n", status=401,
                        content_type="text/plain; charset=utf-8", headers={"WWW-Authenticate": "Bearer"})
    if not principal.is_admin:
        return Response(f"{principal.name} is an operator's: /metrics needs an admin\n", status=403,
                        content_type="text/plain; charset=utf-8")
    return None
