"""Webhook cost per request, without HTTP: this receiver's Flask app against the floor's, called
through WSGI in-process with distinct pre-signed messages, against a real Redis.

    python bench/webhook_cost.py               # CPU microseconds per request
    python bench/webhook_cost.py --callgrind   # CPU instructions per request

bench/webhook.py measures what Twilio would see (throughput and latency through gunicorn under
wrk), which on a shared 2-core VM swings by ±15% from run to run. This isolates what the code
itself costs. With --callgrind each receiver runs under valgrind twice (100 and 400 requests) and
the difference is divided by 300: an instruction count, the same whatever else the machine does
(needs valgrind; about 3 minutes). Redis's own time is not counted; INFO commandstats shows it.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.database import bench_database_url  # noqa: E402
from shared.redis import connect  # noqa: E402
from bench.webhook import AUTH_TOKEN, CREDENTIALS_KEY, PATH, reset_redis, signed_requests  # noqa: E402

URL = f"http://127.0.0.1:8000{PATH}"
WARM_UP = 50
CALLGRIND_SMALL, CALLGRIND_LARGE = 100, 400


def receiver(name: str, redis_url: str, database_url: str) -> Callable[..., Iterable[bytes]]:
    os.environ.update(REDIS_URL=redis_url, DATABASE_URL=database_url, CREDENTIALS_KEY=CREDENTIALS_KEY,
                      BENCH_AUTH_TOKEN=AUTH_TOKEN,
                      ADMIN_API_TOKEN="bench-admin", MAMMUT_SMS_ENV="production", LOG_LEVEL="INFO")
    os.environ.pop("PUBLIC_URL", None)
    if name == "floor":
        sys.path.insert(0, str(REPO / "bench"))
        from webhook_floor import create_app as create_floor

        return create_floor()
    from webhook import create_app

    return create_app()


def environs(count: int, prefix: str) -> list[dict[str, Any]]:
    """WSGI environs of `count` distinct signed inbound messages, as gunicorn would build them."""
    built = []
    for signature, body in signed_requests(URL, count, senders=2_000, prefix=prefix):
        data = body.encode()
        built.append({
            "REQUEST_METHOD": "POST", "PATH_INFO": PATH, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1:8000",
            "CONTENT_TYPE": "application/x-www-form-urlencoded", "CONTENT_LENGTH": str(len(data)),
            "HTTP_X_TWILIO_SIGNATURE": signature, "wsgi.input": io.BytesIO(data), "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
        })
    return built


def call_all(app: Callable[..., Iterable[bytes]], batch: list[dict[str, Any]]) -> None:
    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        if not status.startswith("200"):
            raise SystemExit(f"got {status}: every request must be acknowledged for the figure to mean anything")

    for environ in batch:
        for _ in app(environ, start_response):
            pass


def run_one(name: str, redis_url: str, requests: int, total: int) -> None:
    """The child: serve `requests` of `total` prepared messages and print CPU time per request.
    Logs go to stderr, as in production; the parent discards them."""
    database_url = bench_database_url()
    reset_redis(redis_url, database_url)
    app = receiver(name, redis_url, database_url)
    call_all(app, environs(WARM_UP, "warm"))
    batch = environs(total, "")[:requests]
    redis = connect(redis_url)
    redis_before = redis_microseconds(redis)
    started = time.process_time()
    call_all(app, batch)
    print(f"CPU_US {(time.process_time() - started) / requests * 1e6:.1f}")
    print(f"REDIS_US {(redis_microseconds(redis) - redis_before) / requests:.1f}")


def redis_microseconds(redis: Any) -> int:
    """Redis's own CPU time in commands so far (INFO commandstats), this process's and any other's."""
    return sum(stats["usec"] for stats in redis.info("commandstats").values())


def child(name: str, redis_url: str, requests: int, total: int, under: list[str] | None = None) -> str:
    command = [*(under or []), sys.executable, __file__, "--child", name, "--redis-url", redis_url,
               "--requests", str(requests), "--total", str(total)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def cpu_microseconds(name: str, redis_url: str, requests: int) -> tuple[float, float]:
    """The receiver's CPU time per request, and Redis's."""
    output = child(name, redis_url, requests, requests)
    return tuple(float(re.search(rf"{figure} ([\d.]+)", output)[1])  # type: ignore[index,return-value]
                 for figure in ("CPU_US", "REDIS_US"))


def instructions(name: str, redis_url: str) -> float:
    counts = []
    for requests in (CALLGRIND_SMALL, CALLGRIND_LARGE):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "callgrind.out"
            output = child(name, redis_url, requests, CALLGRIND_LARGE,
                           under=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
        counts.append(int(re.search(r"Collected : (\d+)", output)[1]))  # type: ignore[index]
    return (counts[1] - counts[0]) / (CALLGRIND_LARGE - CALLGRIND_SMALL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callgrind", action="store_true", help="count instructions under valgrind instead")
    parser.add_argument("--requests", type=int, default=3_000, help="requests per measurement (CPU time)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements per receiver (CPU time)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--child", choices=("webhook", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(args.child, args.redis_url, args.requests, args.total)
        return
    names = ("webhook", "floor")
    if args.callgrind:
        figures = {name: instructions(name, args.redis_url) for name in names}
        unit, detail = "instructions/request", f"under callgrind, ({CALLGRIND_LARGE} - {CALLGRIND_SMALL}) requests"
    else:
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                samples[name].append(cpu_microseconds(name, args.redis_url, args.requests))
        figures = {name: statistics.median(value[0] for value in values) for name, values in samples.items()}
        in_redis = {name: statistics.median(value[1] for value in values) for name, values in samples.items()}
        unit, detail = "CPU us/request", f"median of {args.rounds} rounds of {args.requests} requests"
    for name in names:
        extra = f"   + {in_redis[name]:.0f} us in Redis" if not args.callgrind else ""
        print(f"{name:<8} {figures[name]:12,.0f} {unit}{extra}")
    print(f"ratio webhook/floor cost: {figures['webhook'] / figures['floor']:.2f} ({detail})")
    print(f"command: {sys.executable} bench/webhook_cost.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
