"""Start the Procfile's processes (gunicorn web, dramatiq worker) for real, as a dyno would.

Each runs its Procfile line under /bin/sh in its own process group, with the venv's scripts
on PATH and the given environment; its output goes to a log file a test can read and wait on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import requests

ROOT = Path(__file__).resolve().parents[2]
# Dramatiq's own line once a worker process consumes (its CLI logs it whatever LOG_LEVEL says).
READY_LINE = "Worker process is ready for action"


def procfile(path: Path = ROOT / "Procfile") -> dict[str, str]:
    """Process type -> command, as Heroku and honcho read it."""
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() and not name.startswith("#"):
            entries[name.strip()] = command.strip()
    return entries


class Process:
    """One Procfile process; `kill()` is a crash (SIGKILL to the whole group), `stop()` a dyno shutdown."""

    def __init__(self, kind: str, env: dict[str, str], command: str | None = None) -> None:
        self.kind = kind
        self.command = command  # None: the Procfile's line for `kind`
        self.env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.log_path = Path(tempfile.mkstemp(prefix=f"mammut-{kind}-", suffix=".log")[1])
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        command = self.command or procfile()[self.kind]
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                ["/bin/sh", "-c", f"exec {command}"], cwd=ROOT, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.count(text) >= count:
                return
            if self.popen is not None and self.popen.poll() is not None:
                raise AssertionError(f"{self.kind} exited with {self.popen.returncode}:\n{self.log[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.kind} did not log {text!r} x{count} within {timeout}s:\n{self.log[-4000:]}")

    def kill(self) -> None:
        """SIGKILL every process of the group at once: no shutdown hooks, no acks."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` like Heroku's dyno manager."""
        if self.popen is None or self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        try:  # forked children may outlive a leader that exited first
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> Process:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def start_worker(env: dict[str, str], processes: int = 2, threads: int = 8, timeout: float = 30.0,
                 command: str | None = None, ready_line: str = READY_LINE) -> Process:
    """The Procfile's worker (or `command`), ready once every worker process logged `ready_line`."""
    worker = Process("worker", {**env, "WORKER_PROCESSES": str(processes), "WORKER_THREADS": str(threads)},
                     command).start()
    try:
        worker.wait_for_log(ready_line, processes, timeout)
    except BaseException:
        worker.stop(5)
        raise
    return worker


def start_web(env: dict[str, str], port: int, timeout: float = 30.0, command: str | None = None) -> Process:
    """The Procfile's web process (or `command`) on `port`, ready once /healthz answers."""
    web = Process("web", {**env, "PORT": str(port)}, command).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return web
        except requests.RequestException:
            pass
        if web.popen is not None and web.popen.poll() is not None:
            break
        time.sleep(0.1)
    web.stop(5)
    raise AssertionError(f"web did not answer /healthz within {timeout}s:\n{web.log[-4000:]}")
