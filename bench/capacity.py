"""Capacity of one worker dyno: the Procfile's worker line, started as Heroku starts it (two
processes), answering many people at once through an engine that takes seconds per answer.

    python bench/capacity.py                                   # both scenarios of the README
    python bench/capacity.py --pool threads --threads 200 --engine-seconds 1 --messages 3000
    python bench/capacity.py --pool gevent --threads 1000 --engine-seconds 5 --messages 6000
    python bench/capacity.py --ingest                          # issue 28's way: through the webhook

The messages come one per person, so each conversation waits on its own engine call. By default
they are stored as the webhook stores them before the worker starts, and the figure is the replies
that reached the Twilio stand-in per second, from the first to the last. With --ingest the
Procfile's web process (2 gunicorn workers) receives them as Twilio would send them, signed, from
16 client threads, while the worker answers: then the figure is the messages per second from the
first POST to the 99th percentile reply (issue 28's measure; the first-to-last rate is printed
too), and the web's log is searched for errors as well. Also printed: the worker's peak memory (RSS of
the whole process group), and the counts that must be zero: errors and tracebacks in the worker's
log, "Too many connections", leases lost, replies sent twice, people left unanswered.

Uses Redis db 12 (flushed) and the benchmarks' database (bench/database.py). The Twilio stand-in
runs in this process, the fake engine in a process of its own (its thousands of calls held open
for seconds would otherwise share this process's GIL with the load and the stand-in), both on real
local ports.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
# The README's two scenarios: (pool, threads per process, engine seconds, messages, target msg/s).
SCENARIOS = [("threads", 200, 1.0, 3000, 200), ("gevent", 1000, 5.0, 6000, 150)]
PROCESSES = 2  # a Heroku worker dyno, as the Procfile's default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", choices=("threads", "gevent"))
    parser.add_argument("--threads", type=int, help="WORKER_THREADS: threads or greenlets per process")
    parser.add_argument("--engine-seconds", type=float)
    parser.add_argument("--messages", type=int)
    parser.add_argument("--bots", type=int, default=10)
    parser.add_argument("--ingest", action="store_true",
                        help="send the messages through the webhook while the worker runs (issue 28's figures)")
    args = parser.parse_args()
    scenarios = SCENARIOS
    if args.pool:
        pool, threads, seconds, messages, target = next(s for s in SCENARIOS if s[0] == args.pool)
        scenarios = [(pool, args.threads or threads, args.engine_seconds or seconds, args.messages or messages,
                      target)]
    print(f"command: {sys.executable} bench/capacity.py {' '.join(sys.argv[1:])}".rstrip())
    for scenario in scenarios:
        run(*scenario, bots=args.bots, ingest=args.ingest)


def run(pool: str, threads: int, engine_seconds: float, messages: int, target: float, bots: int,
        ingest: bool = False) -> None:
    from cryptography.fernet import Fernet

    from bench.database import bench_database_url, describe, service_env, settled
    from bench.e2e import create_bots, post_all
    from cli.twilio_standin import TwilioStandin
    from shared.redis import connect
    from tests.conftest import free_port
    from tests.support.fake_engine import EngineProcess
    from tests.support.processes import Process, procfile, start_web, start_worker

    os.environ.setdefault("CREDENTIALS_KEY", Fernet.generate_key().decode())
    redis = connect(REDIS_URL)
    redis.flushdb()
    settled(redis)
    database_url = bench_database_url()
    web: Process | None = None
    with TwilioStandin() as twilio, EngineProcess(delay=engine_seconds) as engine:
        env = service_env(REDIS_URL, database_url, twilio.url, WORKER_POOL=pool, WEB_CONCURRENCY="2")
        numbers = create_bots(redis, database_url, bots, engine.url)
        if ingest:
            port = free_port()
            web = start_web(env, port)
        else:
            store_messages(redis, numbers, messages)
        memory = PeakMemory()
        worker = start_worker(env, processes=PROCESSES, threads=threads, timeout=60)
        try:
            memory.watch(worker.popen.pid)  # type: ignore[union-attr]
            started = time.time()
            if web is not None:  # one person per message, as stored above
                post_all(port, list(numbers), messages, messages, "C")
            try:
                arrived = twilio.wait_for(messages, timeout=max(120.0, messages / 20))
            except AssertionError:
                kept = Path(tempfile.mkdtemp(prefix="capacity-"))
                (kept / "worker.log").write_text(worker.log)
                (kept / "web.log").write_text(web.log if web is not None else "")
                (kept / "redis.txt").write_text(_redis_state(redis))
                print(f"not every reply arrived: the logs and Redis's state are in {kept}", file=sys.stderr)
                raise
            time.sleep(2.0)  # room for a repeated send to arrive, were one coming
            sent = twilio.messages
        finally:
            memory.stop()
            worker.stop(30)
            if web is not None:
                web.stop(30)
        log = worker.log + (web.log if web is not None else "")
    redis.flushdb()

    times = sorted(message.received_at for message in arrived)
    rate = (len(times) - 1) / (times[-1] - times[0])
    p99 = math.ceil(0.99 * messages)
    rate_p99 = p99 / (times[p99 - 1] - started)
    repeated = sum(count - 1 for count in Counter((m.to, m.body) for m in sent).values() if count > 1)
    unanswered = messages - len({m.to for m in sent})
    counts = {
        "errors": len(re.findall(r'"level": ?"(?:error|critical)"|\[(?:error|critical)\s*\]|\[ERROR\]|\[CRITICAL\]', log)),
        "tracebacks": log.count("Traceback"),
        "too_many_connections": log.count("Too many connections"),
        "leases_lost": len(re.findall(r"lease[._]lost", log)),
        "repeated_sends": repeated,
        "unanswered": unanswered,
    }
    print(f"\n{pool}: {PROCESSES} processes x {threads} {'greenlets' if pool == 'gevent' else 'threads'}, "
          f"engine {engine_seconds:.0f} s, {messages} messages from {messages} people to {bots} bots")
    print(f"  worker:     {procfile()['worker']}  (WORKER_POOL={pool} WORKER_PROCESSES={PROCESSES} "
          f"WORKER_THREADS={threads})")
    print(f"  database:   {describe(database_url)}")
    if ingest:
        print(f"  web:        {procfile()['web']}  (WEB_CONCURRENCY=2), {messages} signed POSTs from 16 threads")
        print(f"  throughput: {rate_p99:.1f} messages/s from the first POST to the 99th percentile reply "
              f"(target >= {target}); {rate:.1f} first to last reply")
    else:
        print(f"  throughput: {rate:.1f} messages/s (first to last reply; target >= {target})")
    print(f"  memory:     {memory.peak_mb:.0f} MB peak RSS for the dyno's worker processes "
          f"({memory.peak_mb / PROCESSES:.0f} MB per process)")
    print("  must be 0:  " + ", ".join(f"{name} {value}" for name, value in counts.items()))


def _redis_state(redis: Any) -> str:
    """What work Redis still holds, for a run that did not finish: lists and sorted sets by size."""
    lines = []
    for key in redis.scan_iter(count=1000):
        kind = redis.type(key)
        size = redis.llen(key) if kind == "list" else redis.zcard(key) if kind == "zset" else None
        if size:
            lines.append(f"{size:8d} {kind:5} {key}")
    return "\n".join(sorted(lines, reverse=True))


def store_messages(redis: Any, bots: dict[str, str], messages: int) -> None:
    """What the webhook does with `messages` inbound SMS, each from its own person."""
    from shared.conversations import INBOUND, accept_inbound

    numbers = list(bots)
    now = time.time()
    for n in range(messages):
        number = numbers[n % len(numbers)]
        message = INBOUND.load({"sid": f"SM{n:032x}", "bot_id": bots[number], "sender": f"+1555{n:07d}",
                                "to": number, "body": f"capacity {n}", "received_at": now})
        accept_inbound(redis, message)


class PeakMemory:
    """The largest total RSS of a process group seen, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def watch(self, group: int) -> None:
        threading.Thread(target=self._sample, args=(group,), daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _sample(self, group: int) -> None:
        while not self._stop.wait(0.2):
            total = 0
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if os.getpgid(int(entry.name)) != group:
                        continue
                    status = (entry / "status").read_text()
                except (OSError, ProcessLookupError):
                    continue
                match = re.search(r"VmRSS:\s+(\d+) kB", status)
                total += int(match.group(1)) if match else 0
            self.peak_mb = max(self.peak_mb, total / 1024)


if __name__ == "__main__":
    main()
