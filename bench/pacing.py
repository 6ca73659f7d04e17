"""Pacing: a 30-message burst to one 1-message/s number, and a second number alongside it.

Runs the Procfile's worker (two processes, 40 threads each, as a dyno starts it) against a local
Twilio stand-in, queues the burst on the outbox exactly as the conversation side does, and reads
arrival times at the stand-in. Two shapes of burst: thirty people answered at once, and one
person sent thirty replies (a chain, each reply waiting for the one before). 1 s, 10 s and 20 s
into each burst, a second 1-message/s number has a reply for someone.

Targets (issue 4): no two sends of the busy number within 1 s; the burst done within 32 s of
being queued; the second number's replies at Twilio within 2 s of being queued.

    python bench/pacing.py [--messages 30]

Uses Redis db 12 (flushed).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
BUSY, OTHER = "+15550009001", "+15550009002"


def environment(twilio_url: str, database_url: str) -> dict[str, str]:
    from cryptography.fernet import Fernet

    return {
        "REDIS_URL": REDIS_URL, "DATABASE_URL": database_url, "TWILIO_API_BASE_URL": twilio_url,
        "ADMIN_API_TOKEN": "bench", "ENGINE_ALLOWED_NETWORKS": "127.0.0.0/8",
        "CREDENTIALS_KEY": Fernet.generate_key().decode(), "MAMMUT_SMS_ENV": "development", "LOG_LEVEL": "WARNING",
        "WORKER_PROCESSES": "2", "WORKER_THREADS": "40",
    }


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The Procfile's worker line under /bin/sh, in its own process group."""
    line = next(l for l in (ROOT / "Procfile").read_text().splitlines() if l.startswith("worker:"))
    log = tempfile.NamedTemporaryFile(prefix="bench-pacing-worker-", suffix=".log", delete=False)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.Popen(["/bin/sh", "-c", "exec " + line.partition(":")[2].strip()], cwd=ROOT,
                            env={**os.environ, **env, "PATH": path}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)


def queue(redis: Any, bot: Any, to: str, texts: list[str]) -> None:
    """As the conversation side queues an engine's answer: on the outbox, kicked if it was idle."""
    from shared import keys
    from shared.conversations import new_reply, queue_replies
    from shared.tasks import kick_delivery

    conversation = keys.conversation_id(bot.id, to)
    replies = [new_reply(conversation, to, text, received_at=time.time()) for text in texts]
    kick = queue_replies(redis, conversation, replies)
    if kick is not None:
        kick_delivery(conversation, kick)


def wait_until_ready(twilio: Any, redis: Any, bot: Any, timeout: float = 60.0) -> None:
    """The worker is up once a warm-up reply has gone through it."""
    queue(redis, bot, "+15550008999", ["warm-up"])
    twilio.wait_for(1, timeout=timeout)
    time.sleep(1.5)  # let the warm-up's pace slot pass
    twilio.reset()


def run_burst(twilio: Any, redis: Any, busy: Any, other: Any, count: int, chain: bool) -> dict[str, float]:
    started = time.time()
    if chain:
        queue(redis, busy, "+15551110000", [f"burst {n}" for n in range(count)])
    else:
        for n in range(count):
            queue(redis, busy, f"+1555111{n:04d}", [f"burst {n}"])
    # The second number gets one reply at a time, 1 s, 10 s and 20 s into the burst: each should
    # arrive as if the busy number did not exist.
    other_queued = []
    for at in (1.0, 10.0, 20.0):
        time.sleep(max(started + at - time.time(), 0))
        other_queued.append(time.time())
        queue(redis, other, f"+1555222{len(other_queued):04d}", [f"other {at}"])
    twilio.wait_for(count + len(other_queued), timeout=count * 2 + 30)
    burst = [m.received_at for m in twilio.messages if m.from_ == busy.number]
    others = [m.received_at for m in twilio.messages if m.from_ == other.number]
    gaps = [later - earlier for earlier, later in zip(burst, burst[1:])]
    return {
        "min_gap_s": min(gaps), "mean_gap_s": sum(gaps) / len(gaps), "done_after_s": burst[-1] - started,
        "other_max_delay_s": max(arrived - queued for arrived, queued in zip(others, other_queued)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30)
    args = parser.parse_args()

    from bench.database import bench_database_url, empty
    from cli.twilio_standin import TwilioStandin

    with TwilioStandin() as twilio:
        database_url = bench_database_url()
        env = environment(twilio.url, database_url)
        os.environ.update(env)
        from shared import db
        from shared.bots import BotStore
        from shared.crypto import Vault
        from shared.redis import connect

        redis = connect(REDIS_URL)
        redis.flushdb()
        empty(database_url)
        engine = db.make_engine(database_url, size=1)
        store = BotStore(engine, redis, Vault([env["CREDENTIALS_KEY"]]))
        bots = [store.create({"name": f"pacing {number}", "twilio-account-sid": ACCOUNT_SID,
                              "twilio-auth-token": AUTH_TOKEN, "main-phone-number": number,
                              "messages-per-second": 1}) for number in (BUSY, OTHER)]
        worker = start_worker(env)
        try:
            wait_until_ready(twilio, redis, bots[1])
            print(f"pacing: {args.messages}-message burst to one 1-message/s number; "
                  "a second 1-message/s number answers 3 people, 1 s, 10 s and 20 s in")
            print(f"{'burst':<22}{'min gap s':>10}{'mean gap s':>11}{'done after s':>13}{'2nd number s':>13}")
            for name, chain in (("30 people at once", False), ("1 person, 30 replies", True)):
                figures = run_burst(twilio, redis, *bots, count=args.messages, chain=chain)
                print(f"{name:<22}{figures['min_gap_s']:>10.3f}{figures['mean_gap_s']:>11.3f}"
                      f"{figures['done_after_s']:>13.2f}{figures['other_max_delay_s']:>13.2f}")
                twilio.reset()
                time.sleep(1.5)
            print("targets: min gap >= 1.000, done after <= 32.00 (30 messages), 2nd number <= 2.00")
        finally:
            stop_worker(worker)
            redis.flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main())
