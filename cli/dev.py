"""`mammut-sms dev`: the whole service on one machine, with nothing else installed.

Runs the Procfile's own `web` and `worker` commands as child processes (so what runs here is
what runs on Heroku), with an embedded Redis (fakeredis over TCP) unless REDIS_URL is set, a
SQLite database for the run (migrated first) unless DATABASE_URL is set, a Twilio stand-in that prints every outbound SMS, and a demo bot to text with `mammut-sms simulate`.
With `--pool` the demo bot sends through a Messaging Service whose pool (three numbers) the stand-in knows.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import requests

from cli.twilio_standin import TwilioStandin
from shared.bots import PHONE_NUMBERS, SERVICE_SID, Bot, BotStore
from shared import operators
from shared.crypto import Vault
from shared.access import ADMIN
from shared.db import get_engine, migrate, transaction
from shared.redis import connect
from shared.settings import DEVELOPMENT, Settings, SettingsError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_NUMBER = "+15005550006"
DEMO_SENDER = "+15551230000"
DEMO_ACCOUNT_SID = "AC" + "de" * 16
DEMO_SERVICE_SID = "MG" + "de" * 16
DEMO_POOL = (DEMO_NUMBER, "+15005551001", "+15005551002")  # --pool: the demo Messaging Service's senders
READY_TIMEOUT = 60.0
LOOPBACK = "127.0.0.1"
POLL = 0.1


class DevError(Exception):
    """The dev stack cannot start; the message says why."""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dev", help="run web, worker, an embedded Redis and a Twilio stand-in on this machine",
        description="Start the Procfile's web and worker processes with an embedded Redis (unless REDIS_URL is "
                    "set), a SQLite database for this run (unless DATABASE_URL is set; migrated either way), a local Twilio "
                    "stand-in that prints every outbound SMS, and the built-in echo engine "
                    "(unless ENGINE_URL is set); register a demo bot and print how to text it. Ctrl-C stops it all.",
    )
    parser.add_argument("--port", type=int, default=None, help="the web port (default: $PORT or 5000)")
    parser.add_argument("--host", default=LOOPBACK,
                        help=f"the address web listens on (default {LOOPBACK}: only this machine; dev prints the "
                             "admin token and the demo bot's auth token, so 0.0.0.0 or :: open them to the network)")
    parser.add_argument("--procfile", type=Path, default=None,
                        help="the Procfile to run (default: the project's own, never one in the current directory)")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds the processes get to stop after SIGTERM before SIGKILL (default 30, as Heroku)")
    parser.add_argument("--pool", action="store_true",
                        help=f"the demo bot sends through Messaging Service {DEMO_SERVICE_SID}, whose pool is "
                             f"{', '.join(DEMO_POOL)} (a demo bot left by an earlier run is reused as it is)")
    parser.set_defaults(run=run)


# --- output ---------------------------------------------------------------------------------


class Console:
    """One line at a time, each prefixed with its source, like honcho's `web.1 | ...`."""

    def __init__(self, stream: IO[str] | None = None, width: int = 8) -> None:
        self._stream = stream or sys.stdout
        self._width = width
        self._lock = threading.Lock()

    def line(self, source: str, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with self._lock:
            self._stream.write(f"{stamp} {source.ljust(self._width)} | {text.rstrip()}\n")
            self._stream.flush()

    def say(self, text: str = "") -> None:
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()


# --- the Procfile and its processes ------------------------------------------------------------


def read_procfile(path: Path) -> dict[str, str]:
    """Process type -> command, in file order."""
    commands: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        name, _, command = line.partition(":")
        commands[name.strip()] = command.strip()
    return commands


def ipv6_available() -> bool:
    """Whether gunicorn's `[::]` bind (Heroku's recommendation) can work on this machine."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


def web_command(command: str, port: int, host: str = LOOPBACK) -> str:
    """The Procfile's web line bound to `host` (gunicorn's command line overrides the config file's
    `[::]`, which listens on every interface; `::` without IPv6 becomes 0.0.0.0 rather than fail)."""
    if host == "::" and not ipv6_available():
        host = "0.0.0.0"
    address = f"[{host}]" if ":" in host else host
    return f"{command} --bind {shlex.quote(f'{address}:{port}')}"


def listens_beyond_this_machine(host: str) -> bool:
    return host not in ("localhost", "::1") and not host.startswith("127.")


@dataclass
class Child:
    name: str
    process: subprocess.Popen[str]
    pump: threading.Thread

    @property
    def running(self) -> bool:
        return self.process.poll() is None


def start_child(name: str, command: str, env: Mapping[str, str], cwd: Path, console: Console) -> Child:
    # Its own session: Ctrl-C reaches only this supervisor, which then stops each process in turn.
    # `exec`: the shell becomes the Procfile's process, so SIGTERM reaches gunicorn's or dramatiq's
    # main process, which stops its own workers gracefully.
    process = subprocess.Popen(
        f"exec {command}", shell=True, cwd=cwd, env=dict(env), start_new_session=True, text=True, bufsize=1,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, errors="replace",
    )
    pump = threading.Thread(target=_pump, args=(process, name, console), name=f"pump-{name}", daemon=True)
    pump.start()
    return Child(name, process, pump)


def _pump(process: subprocess.Popen[str], name: str, console: Console) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        console.line(name, line)


def stop_children(children: list[Child], grace: float, console: Console) -> None:
    """SIGTERM each main process, then SIGKILL whatever is left of its group after `grace`.

    Only the main process: dramatiq's worker processes take a second SIGTERM (their main forwards
    one) as an order to quit at once, which would skip their graceful shutdown.
    """
    for child in children:
        if child.running:
            child.process.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            console.line("dev", f"{child.name} did not stop within {grace:g} s: killing it")
    for child in children:
        # Also reaps grandchildren (gunicorn's and dramatiq's workers) that outlived their parent.
        _signal_group(child, signal.SIGKILL)
        child.process.wait(timeout=10)
        child.pump.join(timeout=5)


def _signal_group(child: Child, signum: int) -> None:
    try:
        os.killpg(child.process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group is gone already


# --- embedded services ---------------------------------------------------------------------


@contextmanager
def in_background(server: Any, name: str) -> Iterator[None]:
    """Run a socketserver-style `server` on a daemon thread; shut it down and close it on exit."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def scratch_database() -> Iterator[str]:
    """A SQLite file in a temporary folder, migrated, shared by web and worker, gone on exit."""
    with tempfile.TemporaryDirectory(prefix="mammut-sms-dev-") as folder:
        url = f"sqlite:///{folder}/dev.sqlite3"
        migrate(url)
        yield url


@contextmanager
def embedded_redis() -> Iterator[str]:
    """fakeredis's TCP server in this process: a real Redis protocol endpoint both children share."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    with in_background(server, "embedded-redis"):
        yield f"redis://127.0.0.1:{server.server_address[1]}/0"


def child_environment(base: Mapping[str, str], port: int, redis_url: str, twilio_url: str,
                      database_url: str) -> dict[str, str]:
    env = dict(base)
    env.update({
        "PORT": str(port),
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "TWILIO_API_BASE_URL": twilio_url,
        "MAMMUT_SMS_ENV": DEVELOPMENT,
        "PYTHONUNBUFFERED": "1",  # piped output would otherwise arrive in late blocks
    })
    env.setdefault("ADMIN_API_TOKEN", secrets.token_urlsafe(24))
    env.setdefault("PUBLIC_URL", f"http://localhost:{port}")
    # A laptop needs few: the Procfile's defaults are sized for a dyno.
    env.setdefault("WORKER_PROCESSES", "1")
    env.setdefault("WORKER_THREADS", "8")
    env.setdefault("WEB_CONCURRENCY", "1")
    # The Procfile's gunicorn and dramatiq live next to this interpreter, activated or not.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def wait_until_ready(port: int, children: list[Child], timeout: float = READY_TIMEOUT, host: str = LOOPBACK) -> None:
    deadline = time.monotonic() + timeout
    probe = LOOPBACK if host in ("0.0.0.0", "::") else host
    url = f"http://{f'[{probe}]' if ':' in probe else probe}:{port}/readyz"
    with requests.Session() as session:
        session.trust_env = False
        while time.monotonic() < deadline:
            dead = [child.name for child in children if not child.running]
            if dead:
                raise DevError(f"{', '.join(dead)} exited during start-up (see its output above)")
            try:
                if session.get(url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(POLL)
    raise DevError(f"the web process did not answer {url} within {timeout:g} s")


def demo_bot(settings: Settings, pooled: bool = False) -> Bot:
    """The demo bot on DEMO_NUMBER in settings.database_url: reused when a previous run left it there.
    `pooled`: a new one also has DEMO_POOL's other numbers and sends through DEMO_SERVICE_SID."""
    store = BotStore(get_engine(settings), connect(settings.redis_url), Vault(settings.credentials_keys))
    existing = store.by_number(DEMO_NUMBER)
    pool = {SERVICE_SID: DEMO_SERVICE_SID, PHONE_NUMBERS: list(DEMO_POOL[1:])} if pooled else {}
    if existing is not None and pooled and existing.messaging_service_sid != DEMO_SERVICE_SID:
        return store.update(existing.id, pool)  # a previous run's demo bot, without the pool
    if existing is not None:
        return existing
    return store.create({
        "name": "demo-bot", "twilio-account-sid": DEMO_ACCOUNT_SID,
        "twilio-auth-token": secrets.token_hex(16), "main-phone-number": DEMO_NUMBER, **pool,
    })


DEMO_OPERATOR = "admin@dev.localhost"


def demo_operator(settings: Settings) -> tuple[str, str]:
    """An admin account of the console with a new password for this run: (email, password)."""
    password = secrets.token_urlsafe(12)
    with transaction(get_engine(settings)) as connection:
        if operators.set_password(connection, DEMO_OPERATOR, password) is None:
            operators.add(connection, DEMO_OPERATOR, ADMIN, [], password)
    return DEMO_OPERATOR, password


def simulate_command(local: str, to: str, auth_token: str, admin_token: str, bot_id: int | None = None) -> str:
    """The `mammut-sms simulate` line the banner prints, for a shell. Options are written --name=value: a
    token may begin with "-" (token_urlsafe's alphabet has it), which argparse would take for an option."""
    words = ["mammut-sms", "simulate", f"--url={local}/channels/sms/", f"--to={to}", f"--from={DEMO_SENDER}"]
    if bot_id is not None:
        words.append(f"--bot-id={bot_id}")
    words += [f"--auth-token={auth_token}", f"--admin-token={admin_token}", "Hola"]
    return shlex.join(words)


def banner(console: Console, env: Mapping[str, str], bot: Bot, embedded: bool, twilio_url: str,
           console_login: tuple[str, str] | None = None) -> None:
    port = env["PORT"]
    local = f"http://localhost:{port}"
    command = simulate_command(local, bot.number, bot.auth_token, env["ADMIN_API_TOKEN"])
    redis = f"embedded, in memory ({env['REDIS_URL']})" if embedded else "REDIS_URL"
    database = "DATABASE_URL" if os.environ.get("DATABASE_URL") else f"SQLite, for this run only ({env['DATABASE_URL']})"
    engine = env.get("ENGINE_URL") or "built-in echo (set ENGINE_URL for your own)"
    console.say("")
    console.say(f"mammut-sms dev is running on {local}")
    console.say(f"  webhook:     {env['PUBLIC_URL']}/channels/sms/   (metrics: {local}/metrics, API: {local}/openapi.json)")
    console.say(f"  redis:       {redis}")
    console.say(f"  database:    {database}")
    console.say(f"  twilio:      stand-in at {twilio_url}: every outbound SMS is printed as 'twilio | SMS ...'")
    console.say(f"  engine:      {engine}")
    console.say(f"  admin token: {env['ADMIN_API_TOKEN']}   (ADMIN_API_TOKEN, for the registry API and /metrics)")
    if console_login:
        console.say(f"  console:     {local}/console/   (sign in as {console_login[0]}, password {console_login[1]})")
    console.say(f"Demo bot {bot.id} ({bot.name}) answers on {bot.number}. Text it:")
    console.say(f"  {command}")
    if bot.messaging_service_sid and bot.phone_numbers:
        pooled = simulate_command(local, bot.phone_numbers[0], bot.auth_token, env["ADMIN_API_TOKEN"], bot.id)
        console.say(f"It sends through Messaging Service {bot.messaging_service_sid} (pool: {bot.number}, "
                    f"{', '.join(bot.phone_numbers)}); a reply comes from the number texted:")
        console.say(f"  {pooled}")
    console.say("Press Ctrl-C to stop.")
    console.say("")


# --- the supervisor ------------------------------------------------------------------------


class _Stop:
    """Set by SIGINT/SIGTERM; polled, since a handler must not block on a lock the main thread holds."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True


def run(args: argparse.Namespace) -> int:
    console = Console()
    try:
        return supervise(args, console)
    except (DevError, SettingsError) as error:
        console.line("dev", f"error: {error}")
        return 1


def supervise(args: argparse.Namespace, console: Console) -> int:
    procfile = args.procfile or _default_procfile()
    commands = read_procfile(procfile)
    missing = {"web", "worker"} - commands.keys()
    if missing:
        raise DevError(f"{procfile} has no {', '.join(sorted(missing))} process")
    port = args.port or int(os.environ.get("PORT") or 5000)
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ExitStack() as stack:
            embedded = not os.environ.get("REDIS_URL")
            redis_url = stack.enter_context(embedded_redis()) if embedded else os.environ["REDIS_URL"]
            services = {DEMO_SERVICE_SID: DEMO_POOL} if args.pool else None
            standin = stack.enter_context(TwilioStandin(echo=lambda line: console.line("twilio", line),
                                                        status_callbacks=True, services=services))
            if os.environ.get("DATABASE_URL"):
                database_url = os.environ["DATABASE_URL"]
                migrate(Settings.from_env({**os.environ, "MAMMUT_SMS_ENV": DEVELOPMENT}).database_url or database_url)
            else:
                database_url = stack.enter_context(scratch_database())
            env = child_environment(os.environ, port, redis_url, standin.url, database_url)
            return _run_children(commands, env, procfile.parent, args.grace, stop, console, embedded, standin.url,
                                 args.pool, args.host)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_children(commands: Mapping[str, str], env: dict[str, str], cwd: Path, grace: float, stop: _Stop,
                  console: Console, embedded: bool, twilio_url: str, pooled: bool = False, host: str = LOOPBACK) -> int:
    """Start web and worker, show the banner, and stop them (before the embedded services) however this ends."""
    settings = Settings.from_env(env)
    port = int(env["PORT"])
    children: list[Child] = []
    try:
        for name in ("web", "worker"):
            command = web_command(commands[name], port, host) if name == "web" else commands[name]
            console.line("dev", f"starting {name}: {command}")
            children.append(start_child(name, command, env, cwd, console))
        wait_until_ready(port, children, host=host)
        if listens_beyond_this_machine(host):
            console.line("dev", f"warning: web listens on {host}, beyond this machine: anyone who can reach it can "
                                "use the admin token and the demo bot's auth token printed below")
        banner(console, env, demo_bot(settings, pooled), embedded, twilio_url, demo_operator(settings))
        return _watch(children, stop, console)
    finally:
        console.line("dev", "stopping")
        stop_children(children, grace, console)


def _watch(children: list[Child], stop: _Stop, console: Console) -> int:
    """Until Ctrl-C (exit 0) or a process dies on its own (exit 1, everything else is stopped)."""
    while not stop.requested:
        for child in children:
            if not child.running:
                console.line("dev", f"{child.name} exited with code {child.process.returncode}: stopping everything")
                return 1
        time.sleep(POLL)
    return 0


def _default_procfile() -> Path:
    # The project's own, not whatever Procfile the current directory holds: dev must not run a stranger's commands.
    return PROJECT_ROOT / "Procfile"
