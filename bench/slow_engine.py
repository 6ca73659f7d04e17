"""Sustained throughput of one worker dyno, as the Procfile starts it, when the engine takes 1 s per answer.

Many senders write at once (a few messages each, so conversations overlap); the rate is the
messages that reached the Twilio stand-in over the time from the first POST to the last arrival (target: >= 50 messages/s).

    python bench/slow_engine.py [--messages 1500] [--senders 500]

Uses Redis db 11 (flushed). The fakes and the load generator run in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e2e import make_bots, post_all  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
ENGINE_SECONDS = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--senders", type=int, default=500)
    parser.add_argument("--bots", type=int, default=10)
    args = parser.parse_args()

    from cryptography.fernet import Fernet

    from bench.database import bench_database_url, describe, service_env
    from cli.twilio_standin import TwilioStandin
    from shared.redis import connect
    from tests.conftest import free_port
    from tests.support.fake_engine import FakeEngine
    from tests.support.processes import procfile, start_web, start_worker

    os.environ.setdefault("CREDENTIALS_KEY", Fernet.generate_key().decode())
    redis = connect(REDIS_URL)
    redis.flushdb()
    database_url = bench_database_url()
    with TwilioStandin() as twilio, FakeEngine(delay=ENGINE_SECONDS) as engine:
        env = service_env(REDIS_URL, database_url, twilio.url)
        port = free_port()
        numbers = make_bots(redis, database_url, args.bots, engine.url)
        web = start_web(env, port)
        # The Procfile's own worker line, with its default processes and threads.
        worker = start_worker({k: v for k, v in env.items()}, processes=2, threads=40, command=procfile()["worker"])
        try:
            started = time.time()
            post_all(port, numbers, args.senders, args.messages, "S", clients=16)
            arrived = sorted(m.received_at for m in twilio.wait_for(args.messages, timeout=600))
        finally:
            worker.stop(30)
            web.stop(30)
    redis.flushdb()
    low, high = arrived[len(arrived) // 10], arrived[len(arrived) * 9 // 10]
    rate = (len(arrived) * 8 // 10) / (high - low)
    print(f"command: {sys.executable} bench/slow_engine.py --messages {args.messages} --senders {args.senders} "
          f"--bots {args.bots}")
    print(f"worker:  {procfile()['worker']}  (defaults: 2 processes x 40 threads)")
    print(f"database: {describe(database_url)}")
    print(f"engine:  {ENGINE_SECONDS:.1f} s per answer; {len(engine.calls)} calls")
    # The whole run is the conservative figure: arrivals come in bursts, which flatters a window.
    print(f"sustained: {len(arrived) / (arrived[-1] - started):.1f} messages/s (first POST to last arrival; "
          f"target >= 50)")
    print(f"busiest:   {rate:.1f} messages/s (10th-90th percentile of arrivals)")
    calls = sorted(call.at for call in engine.calls)
    print(f"engine calls started: {len(calls) / (calls[-1] - calls[0]):.1f} per second")


if __name__ == "__main__":
    main()
