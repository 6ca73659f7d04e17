"""End-to-end throughput: signed webhook POST -> Redis -> worker -> engine -> Twilio, with instant fakes.

Runs the product (the Procfile's web and worker processes) and a floor service (a bare Flask
receiver that validates the signature and enqueues, a bare Dramatiq actor that makes the same
engine and Twilio calls) one after the other, on the same machine, with the same process and
thread counts, and prints messages/s for both and their ratio (target: product >= 0.85 x floor),
and what Redis did per message for each (commands, script calls, CPU).

    python bench/e2e.py [--messages 1500] [--bots 10] [--senders 200]

Uses Redis db 10 (flushed). The fakes and the load generator run in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from twilio.request_validator import RequestValidator  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
WEB_CONCURRENCY, WORKER_PROCESSES, WORKER_THREADS = "2", "2", "40"


# --- The floor: the least any such service must do, as plain as it can be written. ---------


def floor_app() -> Any:
    """gunicorn 'bench.e2e:floor_app()': validate Twilio's signature, enqueue, answer empty TwiML."""
    import dramatiq
    from flask import Flask, Response, request

    broker = floor_broker()
    validator = RequestValidator(AUTH_TOKEN)
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    @app.post("/channels/sms/")
    def receive() -> Response:
        if not validator.validate(request.url, request.form, request.headers.get("X-Twilio-Signature", "")):
            return Response("forbidden", 403)
        broker.enqueue(dramatiq.Message(queue_name="floor", actor_name="floor_reply",
                                        args=(request.form.to_dict(),), kwargs={}, options={}))
        return Response("<Response/>", content_type="text/xml")

    return app


_floor_broker: Any = None


def floor_broker() -> Any:
    """dramatiq 'bench.e2e:floor_broker': one actor calling the engine, then Twilio, per message."""
    global _floor_broker
    if _floor_broker is not None:
        return _floor_broker
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from twilio.rest import Client

    broker = _floor_broker = RedisBroker(url=os.environ["REDIS_URL"])
    dramatiq.set_broker(broker)
    # dramatiq's CLI logs at INFO, where twilio-python writes every request's URL and headers: the
    # product silences it (shared/logging.py), and so does the floor, or it would pay for logging.
    logging.getLogger("twilio").setLevel(logging.WARNING)
    local = threading.local()

    def clients() -> tuple[requests.Session, Any]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.twilio = Client(ACCOUNT_SID, AUTH_TOKEN)
            local.twilio.api.base_url = os.environ["TWILIO_API_BASE_URL"]
        return local.session, local.twilio

    @dramatiq.actor(actor_name="floor_reply", queue_name="floor", max_retries=0)
    def floor_reply(form: dict[str, str]) -> None:
        session, twilio = clients()
        answer = session.post(os.environ["ENGINE_URL"], timeout=(3, 10), json={
            "sender": form["From"], "message": form.get("Body", ""), "metadata": {"to": form["To"]}}).json()
        for item in answer:
            twilio.messages.create(to=form["From"], from_=form["To"], body=item["text"])

    return broker


# --- The load: signed Twilio webhooks from many senders to many bots. ------------------------


def make_bots(redis: Any, database_url: str, count: int, engine_url: str) -> list[str]:
    """Bots on fast numbers (pacing is not what this measures), the only ones; returns their numbers."""
    return list(create_bots(redis, database_url, count, engine_url))


def create_bots(redis: Any, database_url: str, count: int, engine_url: str) -> dict[str, str]:
    """make_bots, returning each bot's id by its number."""
    from bench.database import empty
    from shared import db
    from shared.bots import BotStore
    from shared.crypto import Vault

    empty(database_url)
    engine = db.make_engine(database_url, size=1)
    store = BotStore(engine, redis, Vault([os.environ["CREDENTIALS_KEY"]]))
    numbers = [f"+1500555{n:04d}" for n in range(count)]
    ids = {}
    for number in numbers:
        ids[number] = store.create({"name": number, "twilio-account-sid": ACCOUNT_SID, "twilio-auth-token": AUTH_TOKEN,
                                    "main-phone-number": number, "engine-url": engine_url,
                                    "messages-per-second": 10_000}).id
    engine.dispose()
    return ids


def post_all(port: int, numbers: list[str], senders: int, messages: int, label: str, clients: int = 16) -> None:
    """POST `messages` signed webhooks, spread over bots and senders, from `clients` threads."""
    url = f"http://127.0.0.1:{port}/channels/sms/"
    validator = RequestValidator(AUTH_TOKEN)
    local = threading.local()

    def post(n: int) -> None:
        session = getattr(local, "session", None) or setattr(local, "session", requests.Session()) or local.session
        form = {"MessageSid": f"SM{label}{n:030d}", "AccountSid": ACCOUNT_SID, "From": f"+1555{n % senders:07d}",
                "To": numbers[n % len(numbers)], "Body": f"message {n}", "NumMedia": "0", "NumSegments": "1"}
        headers = {"X-Twilio-Signature": validator.compute_signature(url, form)}
        response = session.post(url, data=form, headers=headers, timeout=15)
        if response.status_code != 200:
            raise RuntimeError(f"webhook answered {response.status_code}: {response.text[:200]}")

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(post, range(messages)))


def measure(start: Callable[[], list[Any]], port: int, twilio: Any, numbers: list[str], senders: int,
            messages: int, label: str, redis: Any) -> tuple[float, dict[str, float]]:
    """Messages/s from the first POST to the last message reaching the Twilio stand-in, and what
    Redis did per message meanwhile (commands, counting those run inside scripts; script calls;
    Redis CPU in ms)."""
    processes = start()
    try:
        post_all(port, numbers, senders, 20, label + "w")  # warm up connections and imports
        twilio.wait_for(20, timeout=60)
        twilio.reset()
        before = redis_work(redis)
        started = time.time()
        post_all(port, numbers, senders, messages, label)
        arrived = twilio.wait_for(messages, timeout=600)
        rate = messages / (arrived[messages - 1].received_at - started)
        time.sleep(0.5)  # the last acknowledgements and log records
        after = redis_work(redis)
        return rate, {name: (after[name] - before.get(name, 0)) / messages for name in after}
    finally:
        for process in processes:
            process.stop(30)


def redis_work(redis: Any) -> dict[str, float]:
    """Redis's counters so far: commands (scripts' own included), EVAL/EVALSHA calls, CPU ms."""
    stats = redis.info("commandstats")
    counted = {name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items() if name != "cmdstat_info"}
    scripts = sum(counted.get(name, 0) for name in ("eval", "evalsha"))
    cpu = redis.info("cpu")
    return {"commands": sum(counted.values()), "scripts": scripts,
            "cpu_ms": (cpu["used_cpu_sys"] + cpu["used_cpu_user"]) * 1000,
            **{"command " + name: calls for name, calls in counted.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--bots", type=int, default=10)
    parser.add_argument("--senders", type=int, default=200)
    parser.add_argument("--breakdown", action="store_true", help="also print each Redis command's calls per message")
    args = parser.parse_args()

    from cryptography.fernet import Fernet

    from cli.twilio_standin import TwilioStandin
    from shared.redis import connect
    from tests.conftest import free_port
    from tests.support.fake_engine import FakeEngine
    from tests.support.processes import start_web, start_worker

    from bench.database import bench_database_url, describe, service_env, settled

    os.environ.setdefault("CREDENTIALS_KEY", Fernet.generate_key().decode())
    database_url = bench_database_url()
    redis = connect(REDIS_URL)
    with TwilioStandin() as twilio, FakeEngine() as engine:
        env = service_env(REDIS_URL, database_url, twilio.url, ENGINE_URL=engine.url, WEB_CONCURRENCY=WEB_CONCURRENCY)
        port = free_port()

        def floor() -> list[Any]:
            redis.flushdb()
            web = start_web(env, port, command="gunicorn 'bench.e2e:floor_app()' --config gunicorn.conf.py")
            try:
                return [web, start_worker(env, int(WORKER_PROCESSES), int(WORKER_THREADS),
                                          command=f"dramatiq bench.e2e:floor_broker --processes {WORKER_PROCESSES} "
                                                  f"--threads {WORKER_THREADS} --worker-shutdown-timeout 25000")]
            except BaseException:
                web.stop(10)
                raise

        def product() -> list[Any]:
            redis.flushdb()
            settled(redis)
            web = start_web(env, port)
            try:
                return [web, start_worker(env, int(WORKER_PROCESSES), int(WORKER_THREADS))]
            except BaseException:
                web.stop(10)
                raise

        redis.flushdb()
        numbers = [f"+1500555{n:04d}" for n in range(args.bots)]
        floor_rate, floor_redis = measure(floor, port, twilio, numbers, args.senders, args.messages, "F", redis)

        def product_with_bots() -> list[Any]:
            processes = product()
            make_bots(redis, database_url, args.bots, engine.url)
            return processes

        product_rate, product_redis = measure(product_with_bots, port, twilio, numbers, args.senders, args.messages,
                                              "P", redis)
    redis.flushdb()
    print(f"command: {sys.executable} bench/e2e.py --messages {args.messages} --bots {args.bots} "
          f"--senders {args.senders}")
    print(f"database: {describe(database_url)}")
    print(f"machine: {os.cpu_count()} CPUs; web {WEB_CONCURRENCY} gunicorn workers, "
          f"worker {WORKER_PROCESSES} processes x {WORKER_THREADS} threads, for both services")
    print(f"floor:   {floor_rate:7.1f} messages/s")
    print(f"product: {product_rate:7.1f} messages/s")
    print(f"ratio:   {product_rate / floor_rate:7.2f} (target >= 0.85)")
    for name, cost in (("floor", floor_redis), ("product", product_redis)):
        print(f"redis per message, {name + ':':8} {cost['commands']:5.1f} commands (inside scripts included), "
              f"{cost['scripts']:4.1f} script calls, {cost['cpu_ms']:.3f} ms Redis CPU")
        if args.breakdown:
            each = sorted(((calls, name.removeprefix("command ")) for name, calls in cost.items()
                           if name.startswith("command ") and calls >= 0.05), reverse=True)
            print("    " + ", ".join(f"{name} {calls:.1f}" for calls, name in each))


if __name__ == "__main__":
    main()
