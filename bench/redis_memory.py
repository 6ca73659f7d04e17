"""Redis memory after work: what 10,000 answered messages from 10,000 people leave behind in Redis.

Starts a Redis server of its own (so `used_memory` is this service's alone), the Procfile's web and
worker, the Twilio stand-in and the built-in echo engine; registers a bot over the registry API;
posts signed webhooks from N different people, waits until every reply reached the stand-in and
every conversation settled and its counters of replies per minute expired (2 minutes), then stops
them and prints Redis's `used_memory` before and after, the bytes per message that remain, and
which keys remain (only the 48-hour marks should: the conversations' hashes per 6 hours, which
hold the dedupe marks and when each person last texted); then what the webhook's Lua step costs
Redis per call, dedupe lookups included.

    python bench/redis_memory.py [--messages 10000]

The database is BENCH_DATABASE_URL, else the local PostgreSQL's mammut_sms_bench (created), else SQLite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
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


def key_bytes(redis: Any) -> Counter[str]:
    """MEMORY USAGE (every element counted, not a sample) summed by kind of key."""
    sizes: Counter[str] = Counter()
    for key in redis.scan_iter(count=1000):
        parts = key.split(":")
        kind = ":".join(parts[:2]) if parts[0] == "sms" else parts[0] + ":" + parts[1].split(".")[0]
        sizes[kind] += redis.memory_usage(key, samples=0) or 0
    return sizes


# The 48-hour marks: the conversations' (keys.MARKS) and the earlier releases' dedupe marks (sms:seen:*).
MARK_KINDS = ("sms:marks", "sms:seen")


def mark_keys(redis: Any) -> list[str]:
    return [key for kind in MARK_KINDS for key in redis.scan_iter(match=kind + ":*", count=1000)]


def dedupe_marks(redis: Any) -> int:
    """The marks: a key each in the earliest shape, else a field of a hash per 6 hours (per message in
    the previous release's keys.seen_hours, per conversation in keys.marks)."""
    return sum(redis.hlen(key) if redis.type(key) == "hash" else 1 for key in mark_keys(redis))


def used_memory_without_marks(redis: Any) -> int:
    """used_memory once the dedupe marks are deleted: what they held, exactly, by the difference
    (MEMORY USAGE leaves out part of a hash's table, and used_memory also holds what no key does)."""
    for chunk in _chunks(mark_keys(redis), 1000):
        redis.delete(*chunk)
    time.sleep(2)
    return int(redis.info("memory")["used_memory"])


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def accept_cost(redis: Any, messages: int = 2000) -> tuple[float, float]:
    """Redis's microseconds per call of the webhook's Lua step (dedupe, queue, wake-up), by INFO
    commandstats: for new messages (every dedupe lookup misses), then for their retries."""
    from shared.conversations import INBOUND, accept_inbound

    timings = []
    for retry in (False, True):
        redis.config_resetstat()
        for n in range(messages):
            message = INBOUND.load({"sid": f"SMcost{n:026d}", "bot_id": 999_999, "sender": f"+1666{n:07d}",
                                    "to": BOT_NUMBER, "body": "cost", "received_at": time.time()})
            accepted = accept_inbound(redis, message, f"token-{n}", account_sid=ACCOUNT_SID)
            assert accepted != retry
        timings.append(float(redis.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]))
    return timings[0], timings[1]


def settled(redis: Any) -> bool:
    from shared import keys
    from shared.tasks import CONVERSATIONS_QUEUE, OUTBOUND_QUEUE, waiting_key

    queued = sum(redis.llen(waiting_key(queue)) for queue in (CONVERSATIONS_QUEUE, OUTBOUND_QUEUE))
    return redis.zcard(keys.PENDING) == 0 and queued == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()

    from cryptography.fernet import Fernet

    from bench.database import bench_database_url, describe, empty
    from cli.twilio_standin import TwilioStandin
    from shared.redis import connect
    from tests.conftest import free_port
    from tests.support.processes import start_web, start_worker

    redis_port = free_port()
    server = start_redis(redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis = connect(redis_url)
    database_url = bench_database_url()
    empty(database_url)
    try:
        with TwilioStandin() as twilio:
            env = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "TWILIO_API_BASE_URL": twilio.url,
                   "CREDENTIALS_KEY": Fernet.generate_key().decode(), "ADMIN_API_TOKEN": ADMIN,
                   "LOG_LEVEL": "WARNING", "WEB_CONCURRENCY": "2"}
            env.pop("ENGINE_URL", None)
            os.environ.pop("ENGINE_URL", None)  # the built-in echo engine
            # Measured with only this script connected, before and after: the processes' connections
            # (tens of kilobytes each, opened as the load needs them) are not the messages' cost.
            before = redis.info("memory")["used_memory"]
            kinds_before = key_kinds(redis)
            port = free_port()
            web = start_web(env, port)
            worker = start_worker(env, 2, 40)
            try:
                created = requests.post(f"http://127.0.0.1:{port}/app:mammut-1/graph/user", timeout=10,
                                        headers={"Authorization": f"Bearer {ADMIN}"},
                                        json={"user-type": "machine", "name": "memory", "twilio-account-sid": ACCOUNT_SID,
                                              "twilio-auth-token": AUTH_TOKEN, "main-phone-number": BOT_NUMBER,
                                              "messages-per-second": 1000})
                created.raise_for_status()
                time.sleep(2)
                started = time.time()
                post_all(port, args.messages)
                twilio.wait_for(args.messages, timeout=1200)
                deadline = time.time() + 120
                while not settled(redis) and time.time() < deadline:
                    time.sleep(0.5)
                elapsed = time.time() - started
                # What stays 48 hours, not what lasts minutes: the replies-per-minute counters live 2.
                deadline = time.time() + 150
                while next(redis.scan_iter(match="sms:conv:*", count=1000), None) and time.time() < deadline:
                    time.sleep(1)
            finally:
                worker.stop(30)
                web.stop(10)
            # Redis shrinks the hash tables that held the peak's keys in its cron: give it a few passes.
            time.sleep(10)
            # Redis 7 keeps a latency histogram per command name once used (about 1 MB here, whatever
            # the number of messages); dropping them leaves what the messages left.
            redis.config_resetstat()
            memory = redis.info("memory")
            after = memory["used_memory"]
            kinds_after = key_kinds(redis)
            by_kind = key_bytes(redis)
            marks = dedupe_marks(redis)
            marks_bytes = after - used_memory_without_marks(redis)
            cost_new, cost_retry = accept_cost(redis)
    finally:
        server.terminate()
        server.wait(10)
    print(f"command: {sys.executable} bench/redis_memory.py --messages {args.messages}")
    print(f"database: {describe(database_url)}; {args.messages} messages from {args.messages} people, "
          f"all answered in {elapsed:.1f} s")
    print(f"used_memory before: {before:,} B; after: {after:,} B; grew by {after - before:,} B = "
          f"{(after - before) / args.messages:.1f} B per message")
    marked = sum(by_kind.get(kind, 0) for kind in MARK_KINDS)
    print(f"marks ({', '.join(MARK_KINDS)}, 48 h): {marks:,} fields or keys in "
          f"{sum(kinds_after.get(kind, 0) for kind in MARK_KINDS):,} keys, {marked:,} B by MEMORY USAGE "
          f"({marked / max(marks, 1):.0f} B each); every other key: "
          f"{sum(v for k, v in by_kind.items() if k not in MARK_KINDS):,} B")
    print(f"the marks held {marks_bytes:,} B of used_memory (freed by deleting them) = "
          f"{marks_bytes / args.messages:.1f} B per message")
    print(f"the webhook's Lua step (dedupe with a MessageSid and an idempotency token, queue, wake-up), by INFO "
          f"commandstats: {cost_new:.1f} us of Redis per new message, {cost_retry:.1f} us per retry")
    print(f"Redis's own overhead after: {memory['used_memory_overhead']:,} B (keyspace and expiry tables, clients, "
          f"replication buffers); dataset {memory['used_memory_dataset']:,} B")
    print("keys before: " + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds_before.items())))
    print("keys after:  " + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds_after.items())))
    others = {kind: count for kind, count in kinds_after.items() if kind not in MARK_KINDS}
    print(f"keys other than the marks: {sum(others.values())} in all, one or two of each kind whatever the "
          f"number of messages: {others}")


if __name__ == "__main__":
    main()
