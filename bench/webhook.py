"""Webhook benchmark: this receiver against a floor receiver, same gunicorn settings, same load.

Run: python bench/webhook.py [--duration 15] [--rounds 3] [--connections 16]

Both receivers serve one after the other on the same port, under the repo's gunicorn.conf.py (2
gthread workers), against a Redis db of their own that is flushed before every run. wrk drives each
with N pre-signed, distinct inbound messages (each its own MessageSid, many senders): the duplicate
path is not the one that matters. A run only counts if every request got 200 and Redis holds as
many stored messages as wrk counted requests: a benchmark of 403s is worthless.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from cryptography.fernet import Fernet
from twilio.request_validator import RequestValidator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared import db, keys, metrics  # noqa: E402
from shared.bots import BotStore  # noqa: E402
from bench.database import bench_database_url, empty, settled  # noqa: E402
from shared.crypto import Vault  # noqa: E402
from shared.redis import connect  # noqa: E402
from shared.tasks import CONVERSATIONS_QUEUE, waiting_key  # noqa: E402
from tests.conftest import free_port  # noqa: E402

BOT_NUMBER = "+15005550006"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
CREDENTIALS_KEY = Fernet.generate_key().decode()
PATH = "/channels/sms/"
QUEUE_KEY = waiting_key(CONVERSATIONS_QUEUE)
ACCEPTED = metrics.field("sms_inbound", result="accepted")
# Before counting: the last in-flight requests land, and each web worker writes its tally of
# accepted texts (every TallyFlush.FLUSH_SECONDS).
SETTLE_SECONDS = metrics.TallyFlush.FLUSH_SECONDS + 0.5
WRK_THREADS = 2
# Issue 28: at least 1.2x the floor's throughput, with a p99 no worse than the floor's.
TARGET_RATIO = 1.2

# Every wrk run ends by printing one JSON line the bench reads.
WRK_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

WRK_SCRIPT = r"""
-- Cycles through pre-signed requests; each wrk thread takes every NTHREADS-th, so none repeats.
local bodies, signatures = {}, {}
local index, stride = 0, __THREADS__
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  for line in io.lines("__DATA__") do
    local tab = line:find("\t", 1, true)
    signatures[#signatures + 1] = line:sub(1, tab - 1)
    bodies[#bodies + 1] = line:sub(tab + 1)
  end
  index = id
end

function request()
  local i = index % #bodies + 1
  index = index + stride
  return wrk.format("POST", "__PATH__", {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["X-Twilio-Signature"] = signatures[i],
  }, bodies[i])
end
""" + WRK_DONE


# wrk's own GET of the URL, reported like the load above.
WRK_GET_SCRIPT = WRK_DONE


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    queued: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def signed_requests(url: str, count: int, senders: int, prefix: str) -> list[tuple[str, str]]:
    """(signature, body) pairs of distinct inbound messages, signed the way Twilio signs them."""
    validator = RequestValidator(AUTH_TOKEN)
    pairs = []
    for n in range(count):
        sid = f"SM{prefix}{uuid.uuid4().hex[len(prefix):]}"
        params = {
            "MessageSid": sid, "SmsMessageSid": sid, "SmsSid": sid, "AccountSid": ACCOUNT_SID,
            "From": f"+1555{n % senders:07d}", "To": BOT_NUMBER, "Body": f"Hola, ¿cómo estás? mensaje {n}",
            "NumMedia": "0", "NumSegments": "1", "SmsStatus": "received", "ApiVersion": "2010-04-01",
            "FromCity": "MADRID", "FromCountry": "ES",
        }
        pairs.append((validator.compute_signature(url, params), urlencode(params)))
    return pairs


def write_load(workdir: Path, name: str, pairs: list[tuple[str, str]]) -> Path:
    data = workdir / f"{name}.tsv"
    data.write_text("".join(f"{signature}\t{body}\n" for signature, body in pairs))
    script = workdir / f"{name}.lua"
    script.write_text(WRK_SCRIPT.replace("__DATA__", str(data)).replace("__PATH__", PATH)
                      .replace("__THREADS__", str(WRK_THREADS)))
    return script


def reset_redis(redis_url: str, database_url: str) -> None:
    """An empty Redis db, and a bots table holding only the bench bot, so every run starts from the same state."""
    redis = connect(redis_url)
    redis.flushdb()
    settled(redis)
    empty(database_url)
    engine = db.make_engine(database_url, size=1)
    BotStore(engine, redis, Vault([CREDENTIALS_KEY])).create({
        "name": "bench", "twilio-account-sid": ACCOUNT_SID, "twilio-auth-token": AUTH_TOKEN,
        "main-phone-number": BOT_NUMBER,
    })
    engine.dispose()


def gunicorn_command(app_spec: str, port: int, extra: list[str]) -> list[str]:
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    config = REPO / "gunicorn.conf.py"
    settings = ["--config", str(config)] if config.exists() else [
        "--workers", "2", "--worker-class", "gthread", "--threads", "4", "--bind", f"127.0.0.1:{port}"]
    return [gunicorn, *settings, *extra, app_spec]


@contextmanager
def serving(name: str, command: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[int]:
    """Run one gunicorn (that we started, and stop by its pid) until /healthz answers; yields its pid."""
    with log.open("ab") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=sink)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/healthz", process, timeout=30)
        yield process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def run_wrk(url: str, script: Path, seconds: int, connections: int) -> dict[str, int]:
    command = ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script), url]
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


def queued(name: str, redis_url: str) -> tuple[int, int]:
    """Messages stored for the workers, and inbound messages the webhook counted as accepted.

    The floor stores each request as a dramatiq message; the webhook stores it on its
    conversation's inbox (and wakes a worker once per conversation, not once per message).
    """
    redis = connect(redis_url)
    accepted = int(redis.hget(keys.METRIC_COUNTERS, ACCEPTED) or 0)
    if name == "floor":
        return int(redis.llen(QUEUE_KEY)), accepted
    pipe = redis.pipeline(transaction=False)
    for inbox in redis.scan_iter(match=keys.inbox("*"), count=1000):
        pipe.llen(inbox)
    return sum(pipe.execute()), accepted


def measure(name: str, command: list[str], env: dict[str, str], args: argparse.Namespace,
            scripts: tuple[Path, Path], workdir: Path, profile: Path | None = None) -> Result:
    warm, load = scripts
    url = f"http://127.0.0.1:{args.port}{PATH}"
    reset_redis(env["REDIS_URL"], env["DATABASE_URL"])
    with serving(name, command, env, args.port, workdir / f"{name}.log") as pid:
        run_wrk(url, warm, 2, args.connections)
        time.sleep(SETTLE_SECONDS)  # let the warm-up's last in-flight requests land before counting
        before = queued(name, env["REDIS_URL"])
        with sampling(pid, args.duration, profile):
            stats = run_wrk(url, load, args.duration, args.connections)
        time.sleep(SETTLE_SECONDS)  # requests wrk sent but did not wait for when its clock stopped
        after = queued(name, env["REDIS_URL"])
    _check(name, stats, before, after, args)
    return Result(name, stats["requests"], stats["duration_us"] / 1e6, stats["p50_us"] / 1000,
                  stats["p99_us"] / 1000, after[0] - before[0])


@contextmanager
def sampling(pid: int, seconds: int, collapsed: Path | None) -> Iterator[None]:
    """py-spy sampling gunicorn's workers (`pid`'s children) for `seconds`, into `collapsed`
    (folded stacks: one line per stack, its sample count last); nothing when `collapsed` is None."""
    if collapsed is None:
        yield
        return
    spy = str(Path(sys.executable).with_name("py-spy"))
    process = subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--duration", str(seconds),
                                "--rate", "200", "--format", "raw", "--output", str(collapsed), "--gil"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        process.wait(timeout=seconds + 60)


def print_profile(collapsed: Path, top: int = 25) -> None:
    """Where the web workers' time went: the functions most often on the stack (inclusive) and at
    its top (self), as shares of the samples of threads that were doing something."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  for frame in stack.split(";") if " (" in frame and not frame.startswith(("process ", "thread "))]
        if not frames or _idle(frames[-1]):
            continue
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    print(f"\nprofile of the web workers under load: {total} busy samples (py-spy, 200 Hz, samples holding the GIL)")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title:>9}  function (file)")
        for frame, samples in counter.most_common(top):
            print(f"{100 * samples / total:8.1f}%  {frame}")


def _idle(frame: str) -> bool:
    """A thread waiting for work or for a socket, not using the CPU."""
    return any(word in frame for word in ("wait (threading.py)", "select (selectors.py)", "poll (selectors.py)",
                                          "_worker (thread.py)", "accept (socket.py)", "sleep"))


def measure_no_work(command: list[str], env: dict[str, str], args: argparse.Namespace, workdir: Path) -> Result:
    """The webhook app's GET /healthz (no Redis, no signature) under the same server and load: how
    much latency the machine's scheduling alone adds with this many connections kept busy."""
    script = workdir / "get.lua"
    script.write_text(WRK_GET_SCRIPT)
    url = f"http://127.0.0.1:{args.port}/healthz"
    with serving("no-work", command, env, args.port, workdir / "no-work.log"):
        run_wrk(url, script, 2, args.connections)
        stats = run_wrk(url, script, args.duration, args.connections)
    if stats["non2xx"] or stats["socket_errors"]:
        raise SystemExit(f"no-work: invalid run: {stats}")
    return Result("no work", stats["requests"], stats["duration_us"] / 1e6, stats["p50_us"] / 1000,
                  stats["p99_us"] / 1000, 0)


def _check(name: str, stats: dict[str, int], before: tuple[int, int], after: tuple[int, int],
           args: argparse.Namespace) -> None:
    """Every request got 200, was distinct, and was queued: otherwise the figures mean nothing."""
    problems = []
    if stats["non2xx"] or stats["socket_errors"]:
        problems.append(f"{stats['non2xx']} non-2xx responses, {stats['socket_errors']} socket errors")
    if stats["requests"] > args.messages:
        problems.append(f"{stats['requests']} requests but only {args.messages} distinct messages: raise --messages")
    # wrk stops its clock with up to one request in flight per connection; the server may have queued those.
    enqueued = after[0] - before[0]
    if not 0 <= enqueued - stats["requests"] <= args.connections:
        problems.append(f"{enqueued} queued for {stats['requests']} requests")
    accepted = after[1] - before[1]
    if name == "webhook" and not 0 <= accepted - stats["requests"] <= args.connections:
        problems.append(f"{accepted} accepted onto inboxes for {stats['requests']} requests")
    if problems:
        raise SystemExit(f"{name}: invalid run: " + "; ".join(problems))


def report(rounds: list[tuple[Result, Result]], command: str, no_work: Result | None = None) -> bool:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs; load average at the end {load} (wrk, Redis and both gunicorns share them)")
    print(f"\n{'round':<6} {'receiver':<9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'requests':>9} {'queued':>8}")
    for number, pair in enumerate(rounds, start=1):
        for result in pair:
            print(f"{number:<6} {result.name:<9} {result.rps:8.0f} {result.p50_ms:7.2f} {result.p99_ms:7.2f} "
                  f"{result.requests:9d} {result.queued:8d}")
    webhook = [pair[0] for pair in rounds]
    floor = [pair[1] for pair in rounds]
    rps_w, rps_f = statistics.median(r.rps for r in webhook), statistics.median(r.rps for r in floor)
    p99_w, p99_f = statistics.median(r.p99_ms for r in webhook), statistics.median(r.p99_ms for r in floor)
    p50_w, p50_f = statistics.median(r.p50_ms for r in webhook), statistics.median(r.p50_ms for r in floor)
    ratio = rps_w / rps_f
    print(f"\nmedian of {len(rounds)} round(s)")
    print(f"{'receiver':<9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
    print(f"{'webhook':<9} {rps_w:8.0f} {p50_w:7.2f} {p99_w:7.2f}")
    print(f"{'floor':<9} {rps_f:8.0f} {p50_f:7.2f} {p99_f:7.2f}")
    if no_work is not None:
        print(f"{'no work':<9} {no_work.rps:8.0f} {no_work.p50_ms:7.2f} {no_work.p99_ms:7.2f}  "
              "(GET /healthz, same server and connections: the machine's own latency floor)")
    ok = ratio >= TARGET_RATIO and p99_w <= p99_f
    print(f"ratio webhook/floor throughput: {ratio:.2f} (target >= {TARGET_RATIO}); "
          f"webhook p99 {p99_w:.1f} ms against the floor's {p99_f:.1f} ms (target: no worse): "
          f"{'met' if ok else 'NOT met'}")
    print(f"command: {command}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=15, help="seconds of load per run")
    parser.add_argument("--rounds", type=int, default=3, help="webhook/floor pairs, alternating (medians reported)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--messages", type=int, default=80_000, help="distinct pre-signed messages")
    parser.add_argument("--senders", type=int, default=2_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--database-url", default=None,
                        help="default: BENCH_DATABASE_URL, else the local PostgreSQL's mammut_sms_bench, else SQLite")
    parser.add_argument("--port", type=int, default=0, help="0: pick a free one")
    parser.add_argument("--profile", action="store_true",
                        help="sample the webhook's workers with py-spy in round 1 and print where the time went "
                             "(pip install py-spy)")
    parser.add_argument("--no-work", action="store_true",
                        help="also measure GET /healthz once, for the latency this machine adds by itself")
    args = parser.parse_args()
    if args.connections < WRK_THREADS:
        parser.error(f"--connections must be at least {WRK_THREADS}: wrk gives each of its {WRK_THREADS} threads one or more")
    args.port = args.port or free_port()
    url = f"http://127.0.0.1:{args.port}{PATH}"
    env = {
        **os.environ, "PORT": str(args.port), "WEB_CONCURRENCY": "2", "REDIS_URL": args.redis_url,
        "DATABASE_URL": args.database_url or bench_database_url(),
        "ADMIN_API_TOKEN": "bench-admin", "CREDENTIALS_KEY": CREDENTIALS_KEY, "MAMMUT_SMS_ENV": "production",
        "LOG_LEVEL": "INFO", "BENCH_AUTH_TOKEN": AUTH_TOKEN, "PYTHONPATH": str(REPO),
    }
    env.pop("PUBLIC_URL", None)
    receivers = {
        "webhook": gunicorn_command("webhook:create_app()", args.port, []),
        "floor": gunicorn_command("bench.webhook_floor:create_app()", args.port, ["--pythonpath", str(REPO)]),
    }
    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as tmp:
        workdir = Path(tmp)
        print(f"signing {args.messages} distinct messages from {args.senders} senders for {url} ...", flush=True)
        scripts = (write_load(workdir, "warm", signed_requests(url, 20_000, args.senders, "warm")),
                   write_load(workdir, "load", signed_requests(url, args.messages, args.senders, "")))
        rounds = []
        for number in range(1, args.rounds + 1):
            pair = []
            for name, command in receivers.items():
                print(f"round {number}: {name}: {shlex.join(command)}", flush=True)
                profile = workdir / "webhook.folded" if args.profile and name == "webhook" and number == 1 else None
                pair.append(measure(name, command, env, args, scripts, workdir, profile))
                if profile is not None and profile.exists():
                    print_profile(profile)
            rounds.append((pair[0], pair[1]))
        no_work = measure_no_work(receivers["webhook"], env, args, workdir) if args.no_work else None
        command = f"{sys.executable} bench/webhook.py " + shlex.join(sys.argv[1:])
        ok = report(rounds, command.strip(), no_work)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
