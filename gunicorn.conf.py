"""gunicorn settings for the web process, following Heroku's recommendations."""

from __future__ import annotations

import os

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
