"""gunicorn settings for the web process, following Heroku's recommendations."""

from __future__ import annotations

import contextlib
import os
from typing import Any

# Heroku routes HTTP to $PORT; dual-stack bind so both IPv4 and IPv6 routers reach us.
bind = [f"[::]:{os.environ.get('PORT', '5000')}"]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# The webhook does a few milliseconds of Redis work per request: threads cover Redis latency
# spikes without the memory of more processes. gthread's, except that a thread gets a request only
# once all of it has arrived, and a request unfinished 10 s after its first byte is closed: slow
# clients hold no thread (issue 14), whatever the router in front does (webhook/slowclient.py).
worker_class = "webhook.slowclient.BufferingThreadWorker"
threads = int(os.environ.get("WEB_THREADS", "4"))
# Under the router's 30 s limit, so gunicorn, not the router, reports a stuck request.
timeout = 25
graceful_timeout = 20
keepalive = 5
# TLS ends at Heroku's router; trust its X-Forwarded-* headers (the app applies ProxyFix too).
forwarded_allow_ips = "*"
accesslog = None
errorlog = "-"
# gunicorn 27's runtime control socket lives at one path per user: several web processes on one
# machine (tests, dev) would fight over it, and nothing here uses it.
control_socket_disable = True
# Fail at start, with the settings error, rather than in every worker.
preload_app = False


# Each web worker counts the texts it accepts in memory (shared.metrics.TALLY) and writes the counts
# to Redis every second, and once more as it exits; /metrics also writes its own process's first.
_tally_flush = None


def post_worker_init(worker: Any) -> None:
    global _tally_flush
    # The service's app only (bench/ serves other apps with these settings).
    if not str(getattr(worker.app, "app_uri", "")).startswith("webhook:"):
        return
    from shared.metrics import TallyFlush
    from shared.redis import get_redis

    _tally_flush = TallyFlush(get_redis()).start()


def worker_exit(server: Any, worker: Any) -> None:
    if _tally_flush is None:
        return
    from shared.metrics import TALLY
    from shared.redis import get_redis

    _tally_flush.stop(timeout=1.0)
    with contextlib.suppress(Exception):  # a Redis that is away loses this last second, as a crash would
        TALLY.flush(get_redis())
