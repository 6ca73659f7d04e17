"""Exactly once under crashes: many people texting many bots through a slow engine while the
worker dyno is SIGKILLed every few seconds and restarted, as a crashing dyno would be.

    python bench/soak.py [--people 1000] [--per-person 10] [--bots 50] [--kill-every 15]

Each person's messages are stored as the webhook stores them (all at once); the worker is the
Procfile's (2 processes x WORKER_THREADS), with PUBLIC_URL pointing at the Procfile's web process so
Twilio's status callbacks (from the stand-in) reach it. Printed: replies sent twice, replies lost,
conversations answered out of order (all must be 0), how the unknown sends were settled, and the
throughput. Uses Redis db 13 (flushed) and the benchmarks' database.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
ENGINE_SECONDS = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=1000)
    parser.add_argument("--per-person", type=int, default=10)
    parser.add_argument("--bots", type=int, default=50)
    parser.add_argument("--threads", type=int, default=200)
    parser.add_argument("--kill-every", type=float, default=15.0)
    args = parser.parse_args()

    from cryptography.fernet import Fernet

    from bench.database import bench_database_url, describe, service_env
    from bench.e2e import create_bots
    from cli.twilio_standin import TwilioStandin
    from shared import keys
    from shared.conversations import INBOUND, accept_inbound
    from shared.redis import connect
    from tests.conftest import free_port
    from tests.support.fake_engine import FakeEngine
    from tests.support.processes import Process, start_web, start_worker

    os.environ.setdefault("CREDENTIALS_KEY", Fernet.generate_key().decode())
    redis = connect(REDIS_URL)
    redis.flushdb()
    database_url = bench_database_url()
    total = args.people * args.per_person
    port = free_port()
    with TwilioStandin(status_callbacks=True) as twilio, FakeEngine(delay=ENGINE_SECONDS) as engine:
        env = service_env(REDIS_URL, database_url, twilio.url, PUBLIC_URL=f"http://127.0.0.1:{port}")
        bots = create_bots(redis, database_url, args.bots, engine.url)
        web = start_web(env, port)
        numbers = list(bots)
        people = [f"+1555{n:07d}" for n in range(args.people)]
        for round_ in range(args.per_person):
            for n, person in enumerate(people):
                number = numbers[n % len(numbers)]
                accept_inbound(redis, INBOUND.load({
                    "sid": f"SM{round_:04d}{n:028d}", "bot_id": bots[number], "sender": person, "to": number,
                    "body": f"m{round_}", "received_at": time.time()}))
        workers: list[Process] = []
        kills = 0
        started = time.time()
        try:
            workers.append(start_worker(env, processes=2, threads=args.threads, timeout=60))
            next_kill = time.time() + args.kill_every
            while len({(m.to, m.body) for m in twilio.messages}) < total and time.time() - started < 900:
                time.sleep(0.2)
                if time.time() >= next_kill:
                    workers[-1].kill()
                    kills += 1
                    workers.append(start_worker(env, processes=2, threads=args.threads, timeout=60))
                    next_kill = time.time() + args.kill_every
            finished = time.time()
            time.sleep(3.0)  # room for a repeat to show up, were one coming
            sent = twilio.messages
        finally:
            for worker in workers:
                worker.stop(30)
            web.stop(10)
        counters = redis.hgetall(keys.METRIC_COUNTERS)  # as flushed once a second (a killed process loses its last)
    redis.flushdb()

    by_person: dict[str, list[str]] = {}
    for message in sorted(sent, key=lambda m: m.received_at):
        by_person.setdefault(message.to, []).append(message.body)
    expected = [f"reply to m{r}" for r in range(args.per_person)]
    repeated = sum(count - 1 for count in Counter((m.to, m.body) for m in sent).values() if count > 1)
    lost = sum(len(set(expected) - set(by_person.get(person, []))) for person in people)
    # Each person's replies, first copies in the order they reached Twilio, must be the messages' order.
    firsts = {person: list(dict.fromkeys(by_person.get(person, []))) for person in people}
    out_of_order = sum(1 for person, bodies in firsts.items() if bodies != expected[:len(bodies)])
    hows = {series.split('how="')[1].rstrip('"}'): int(count) for series, count in counters.items()
            if series.startswith("sms_reconciled")}
    unknown = sum(int(count) for series, count in counters.items() if 'result="outcome_unknown"' in series)
    print(f"command: {sys.executable} bench/soak.py --people {args.people} --per-person {args.per_person} "
          f"--bots {args.bots} --threads {args.threads} --kill-every {args.kill_every}")
    print(f"database: {describe(database_url)}; engine {ENGINE_SECONDS:.0f} s; worker 2 processes x {args.threads} "
          f"threads; web with PUBLIC_URL (status callbacks on)")
    print(f"messages: {total} from {args.people} people to {args.bots} bots; worker SIGKILLed {kills} times")
    print(f"must be 0: replies sent twice {repeated}, replies lost {lost}, conversations out of order {out_of_order}")
    print(f"sends whose answer was lost: {unknown}; settled (sms_reconciled_total, by how): {hows or 'none'}")
    print(f"took {finished - started:.1f} s: {total / (finished - started):.1f} messages/s with the kills")


if __name__ == "__main__":
    main()
