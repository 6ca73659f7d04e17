"""Redis memory after work: what 10,000 answered messages from 10,000 people leave behind in Redis.

Starts a Redis server of its own (so `used_memory` is this service's alone), the Procfile's web and
worker, the Twilio stand-in and the built-in echo engine; registers a bot over the registry API;
posts signed webhooks from N different people, waits until every reply reached the stand-in and
every conversation settled, then prints Redis's `used_memory` before and after, the bytes per
message that remain, and which keys remain (only the 48-hour dedupe marks should).

    python bench/redis_memory.py [--messages 10000]

The database is BENCH_DATABASE_URL, else the local PostgreSQL's mammut_sms_bench (created), else SQLite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from twilio.request_validator import RequestValidator  # noqa: E402

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
BOT_NUMBER = "+15005550006"
ADMIN = "bench-admin"


def start_redis(port: int) -> subprocess.Popen[bytes]:
    if not shutil.which("redis-server"):
        raise SystemExit("needs redis-server on PATH (apt-get install redis-server)")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    for _ in range(100):
        try:
            if redis.Redis(port=port).ping():
                return server
        except redis.RedisError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("redis-server did not start")


def bench_database() -> str:
    from shared import db
    from shared.schema import metadata
    from shared.settings import database_url

    url = database_url(os.environ.get("BENCH_DATABASE_URL")) or ""
    if not url:
        try:
            server = db.make_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", size=1)
            with server.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                if not connection.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname='mammut_sms_bench'").first():
                    connection.exec_driver_sql("CREATE DATABASE mammut_sms_bench")
            server.dispose()
            url = "postgresql+psycopg://postgres@127.0.0.1:5432/mammut_sms_bench"
        except Exception:  # noqa: BLE001 - no PostgreSQL: SQLite
            url = f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
    db.migrate(url)
    engine = db.make_engine(url, size=1)
    with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(table.delete())
    engine.dispose()
    return url


def post_all(port: int, messages: int, clients: int = 16) -> None:
    url = f"http://127.0.0.1:{port}/channels/sms/"
    validator = RequestValidator(AUTH_TOKEN)

    def post(n: int) -> None:
        form = {"MessageSid": f"SM{n:032d}", "AccountSid": ACCOUNT_SID, "From": f"+1555{n:07d}", "To": BOT_NUMBER,
                "Body": f"hello {n}", "NumMedia": "0", "NumSegments": "1"}
        response = session().post(url, data=form, headers={"X-Twilio-Signature": validator.compute_signature(url, form)},
                                  timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"webhook answered {response.status_code}: {response.text[:200]}")

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(post, range(messages)))


_sessions: dict[int, requests.Session] = {}


def session() -> requests.Session:
    import threading

    ident = threading.get_ident()
    if ident not in _sessions:
        _sessions[ident] = requests.Session()
    return _sessions[ident]


def key_kinds(redis: Any) -> Counter[str]:
    """Keys by kind: their name up to the first variable part."""
    kinds: Counter[str] = Counter()
    for key in redis.scan_iter(count=1000):
        parts = key.split(":")
        kinds[":".join(parts[:2]) if parts[0] == "sms" else parts[0] + ":" + parts[1].split(".")[0]] += 1
    return kinds


def settled(redis: Any) -> bool:
    from shared import keys
    from shared.tasks import CONVERSATIONS_QUEUE, OUTBOUND_QUEUE, queue_keys

    queued = sum(redis.llen(queue_keys(queue)[0]) for queue in (CONVERSATIONS_QUEUE, OUTBOUND_QUEUE))
    return redis.zcard(keys.PENDING) == 0 and queued == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()

    from cryptography.fernet import Fernet

    from cli.twilio_standin import TwilioStandin
    from shared.redis import connect
    from tests.conftest import free_port
    from tests.support.processes import start_web, start_worker

    redis_port = free_port()
    server = start_redis(redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis = connect(redis_url)
    database_url = bench_database()
    try:
        with TwilioStandin() as twilio:
            env = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "TWILIO_API_BASE_URL": twilio.url,
                   "CREDENTIALS_KEY": Fernet.generate_key().decode(), "ADMIN_API_TOKEN": ADMIN,
                   "LOG_LEVEL": "WARNING", "WEB_CONCURRENCY": "2"}
            env.pop("ENGINE_URL", None)
            os.environ.pop("ENGINE_URL", None)  # the built-in echo engine
            port = free_port()
            web = start_web(env, port)
            worker = start_worker(env, 2, 40)
            try:
                created = requests.post(f"http://127.0.0.1:{port}/app:mammut-1/graph/user", timeout=10,
                                        headers={"Authorization": f"Bearer {ADMIN}"},
                                        json={"user-type": "machine", "name": "memory", "twilio-account-sid": ACCOUNT_SID,
                                              "twilio-auth-token": AUTH_TOKEN, "main-phone-number": BOT_NUMBER,
                                              "messages-per-second": 10_000})
                created.raise_for_status()
                time.sleep(2)
                before = redis.info("memory")["used_memory"]
                kinds_before = key_kinds(redis)
                started = time.time()
                post_all(port, args.messages)
                twilio.wait_for(args.messages, timeout=1200)
                deadline = time.time() + 120
                while not settled(redis) and time.time() < deadline:
                    time.sleep(0.5)
                elapsed = time.time() - started
                time.sleep(2)
                after = redis.info("memory")["used_memory"]
                kinds_after = key_kinds(redis)
                seen = [key for key in redis.scan_iter("sms:seen:*", count=1000)][:200]
                per_mark = sum(redis.memory_usage(key) or 0 for key in seen) / max(len(seen), 1)
            finally:
                worker.stop(30)
                web.stop(10)
    finally:
        server.terminate()
        server.wait(10)
    print(f"command: {sys.executable} bench/redis_memory.py --messages {args.messages}")
    print(f"database: {database_url.split('@')[-1]}; {args.messages} messages from {args.messages} people, "
          f"all answered in {elapsed:.1f} s")
    print(f"used_memory before: {before:,} B; after: {after:,} B; grew by {after - before:,} B = "
          f"{(after - before) / args.messages:.1f} B per message")
    print(f"dedupe marks (sms:seen, 48 h): {kinds_after.get('sms:seen', 0):,} keys, "
          f"~{per_mark:.0f} B each by MEMORY USAGE")
    print("keys before: " + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds_before.items())))
    print("keys after:  " + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds_after.items())))
    leftover = {kind: count for kind, count in kinds_after.items()
                if kind != "sms:seen" and count > kinds_before.get(kind, 0)}
    print(f"keys that grew with the messages, other than the dedupe marks: {leftover or 'none'}")


if __name__ == "__main__":
    main()
