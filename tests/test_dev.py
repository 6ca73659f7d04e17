"""`mammut-sms dev` as an operator runs it: a real process tree, texted with `mammut-sms simulate`."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from cli.dev import simulate_command
from cli.main import build_parser
from tests.conftest import free_port

SCRIPT = str(Path(sys.executable).parent / "mammut-sms")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
# Variables that would point dev at another Redis, engine or URL than its own.
_OUTSIDE = ("REDIS_URL", "ENGINE_URL", "ADMIN_API_TOKEN", "PUBLIC_URL", "CREDENTIALS_KEY", "TWILIO_API_BASE_URL")


class Output:
    """A process's output lines, read on a thread, waited for with a timeout."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._process = process
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in self.lines if needle in line), None)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not seen within {timeout:g} s; output:\n" + "\n".join(self.lines))
            try:
                self._new.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                pass

    def text(self) -> str:
        return "\n".join(self.lines)

    def close(self) -> None:
        """After the process exited: finish reading and close the pipe."""
        self._thread.join(timeout=10)
        assert self._process.stdout is not None
        self._process.stdout.close()


def _environment(port: int) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in _OUTSIDE}
    env.update({"PORT": str(port), "PYTHONUNBUFFERED": "1"})
    return env


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, read from /proc (children of children included)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def dev() -> Iterator[tuple[subprocess.Popen[str], Output, int]]:
    with _running_dev() as running:
        yield running


@pytest.fixture
def pooled_dev() -> Iterator[tuple[subprocess.Popen[str], Output, int]]:
    with _running_dev("--pool") as running:
        yield running


@contextmanager
def _running_dev(*options: str) -> Iterator[tuple[subprocess.Popen[str], Output, int]]:
    port = free_port()
    process = subprocess.Popen([SCRIPT, "dev", "--grace", "20", *options], env=_environment(port), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    output = Output(process)
    try:
        yield process, output, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        output.close()


def test_dev_runs_the_service_that_simulate_texts_and_stops_cleanly_on_ctrl_c(
    dev: tuple[subprocess.Popen[str], Output, int],
) -> None:
    """With no REDIS_URL, dev serves a demo bot whose echo reply reaches simulate and the stand-in's console,
    and Ctrl-C stops every process it started, exiting 0."""
    process, output, port = dev
    # Given dev has started and printed how to text its demo bot
    output.wait_for("Press Ctrl-C to stop.", START_TIMEOUT)
    assert "embedded, in memory" in output.text()
    command = shlex.split(output.wait_for("mammut-sms simulate ", 1).strip())
    assert f"--url=http://localhost:{port}/channels/sms/" in command
    started = _descendants(process.pid)
    assert started, "dev should have started the web and worker processes"

    # When the operator runs the printed command with another text
    command[0], command[-1] = SCRIPT, "Hello from the test"
    simulated = subprocess.run(command, env=_environment(port), capture_output=True, text=True, timeout=60)

    # Then the echo engine's reply shows in simulate's output and on dev's console (the Twilio stand-in)
    assert 0 == simulated.returncode, simulated.stderr
    assert "echo: Hello from the test" in simulated.stdout
    line = output.wait_for("echo: Hello from the test", 15)
    assert "twilio" in line and "SMS +15005550006 -> +15551230000" in line

    # And the console account it printed signs in
    login = re.search(r"console: +(\S+) +\(sign in as (\S+), password (\S+)\)", output.text())
    assert login, "dev should print a console account"
    browser = requests.Session()
    form = browser.get(login[1] + "sign-in", timeout=30).text
    token = re.search(r'name="csrf" value="([^"]+)"', form)[1]  # type: ignore[index]
    signed = browser.post(login[1] + "sign-in", data={"email": login[2], "password": login[3], "csrf": token},
                          timeout=30, allow_redirects=False)
    assert 302 == signed.status_code and 200 == browser.get(login[1], timeout=30).status_code

    # When Ctrl-C is pressed
    process.send_signal(signal.SIGINT)
    # Then dev exits 0 and leaves no process behind
    assert 0 == process.wait(timeout=STOP_TIMEOUT)
    assert set() == {pid for pid in started if _alive(pid)}
    assert "stopping" in output.text()


def test_dev_pool_demo_answers_through_the_messaging_service_from_the_number_texted(
    pooled_dev: tuple[subprocess.Popen[str], Output, int],
) -> None:
    """With --pool, the demo bot has a Messaging Service whose pool the stand-in knows: texting another of
    its numbers gets the echo from that number, sent through the service."""
    process, output, port = pooled_dev
    # Given dev --pool has started and printed how to text the pool's second number
    output.wait_for("Press Ctrl-C to stop.", START_TIMEOUT)
    assert "Messaging Service MG" + "de" * 16 in output.text()
    command = shlex.split(output.wait_for("--bot-id", 1).strip())
    assert "--to=+15005551001" in command

    # When the operator runs it
    command[0], command[-1] = SCRIPT, "Hello pool"
    simulated = subprocess.run(command, env=_environment(port), capture_output=True, text=True, timeout=60)

    # Then the reply reaches simulate and leaves the stand-in from the texted pool number
    assert 0 == simulated.returncode, simulated.stderr
    assert "echo: Hello pool" in simulated.stdout
    line = output.wait_for("echo: Hello pool", 15)
    assert "twilio" in line and f"SMS +15005551001 -> +15551230000 via MG{'de' * 16}" in line


# ADMIN_API_TOKEN may be the operator's own: the printed line must survive a shell too.
@pytest.mark.parametrize("admin_token", ["-starts-with-a-dash", "--looks-like-an-option", "plain", "a b$HOME'\"x"])
def test_the_printed_simulate_command_parses_whatever_the_tokens_begin_with(admin_token: str) -> None:
    """token_urlsafe may begin a token with "-" (one time in 64): the banner's command must still give it to
    --admin-token instead of argparse refusing it as an option, for both the main number and the pool's."""
    parser = build_parser()
    for bot_id in (None, 7):
        printed = simulate_command("http://localhost:5000", "+15005550006", "-auth", admin_token, bot_id)
        args = parser.parse_args(shlex.split(printed)[1:])
        assert (args.admin_token, args.auth_token, args.to, args.bot_id, args.text) == (
            admin_token, "-auth", "+15005550006", bot_id, "Hola")
        assert "http://localhost:5000/channels/sms/" == args.url


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on `port`, read from /proc/net/tcp and tcp6 (hex)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_dev_listens_on_loopback_and_runs_the_projects_procfile_not_the_current_directorys(tmp_path: Path) -> None:
    """From a directory holding a stranger's Procfile, dev runs the project's web and worker, and web
    listens on 127.0.0.1 only (it prints the admin token): nothing on 0.0.0.0 or [::]."""
    # Given a directory whose Procfile would leave a mark if run
    marker = tmp_path / "ran-the-strangers-procfile"
    (tmp_path / "Procfile").write_text(f"web: touch {marker}; sleep 600\nworker: touch {marker}; sleep 600\n")
    port = free_port()
    # When dev starts there
    process = subprocess.Popen([SCRIPT, "dev", "--grace", "20"], env=_environment(port), text=True, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    output = Output(process)
    try:
        output.wait_for("Press Ctrl-C to stop.", START_TIMEOUT)
        # Then the project's web answers, on loopback alone, and the stranger's commands never ran
        assert {"0100007F"} == _listening_addresses(port)
        assert not marker.exists()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT)
        output.close()


def test_dev_exits_with_an_error_and_leaves_nothing_running_when_the_port_is_taken() -> None:
    """If the web process cannot start (its port is taken), dev says so, stops the rest and exits 1."""
    # Given something already listens on the port
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as taken:
        taken.bind(("::" if socket.has_ipv6 else "0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # When dev starts on it
        process = subprocess.Popen([SCRIPT, "dev", "--grace", "10"], env=_environment(port), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        output = Output(process)
        try:
            code = process.wait(timeout=START_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            output.close()
    # Then it explains and fails, with nothing left running
    assert 1 == code, output.text()
    output.wait_for("exited during start-up", 5)
    assert set() == {pid for pid in _descendants(process.pid) if _alive(pid)}
