"""A fake Rasa REST-channel engine on a real local HTTP port.

It answers `reply to <text>` (or whatever `answer` returns), records every call with its
arrival time, and can be slowed down or made to fail: 5xx, hanging past the client's
timeout, or invalid JSON, for the next N calls or until `up()`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

Answer = Callable[[dict[str, Any]], list[dict[str, Any]]]

FAIL_5XX, FAIL_4XX, FAIL_HANG, FAIL_INVALID_JSON = "5xx", "4xx", "hang", "invalid-json"


def reply_to(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"recipient_id": payload["sender"], "text": f"reply to {payload['message']}"}]


@dataclass(frozen=True)
class EngineCall:
    at: float  # time.time() on arrival
    sender: str
    text: str
    payload: dict[str, Any]


class FakeEngine:
    def __init__(self, delay: float = 0.0, answer: Answer = reply_to, hang_seconds: float = 30.0) -> None:
        self.delay = delay
        self.answer = answer
        self.hang_seconds = hang_seconds
        self._calls: list[EngineCall] = []
        self._failures: list[str] = []
        self._down: str | None = None
        self._in_flight: dict[str, int] = {}
        self._most_in_flight: dict[str, int] = {}
        self._changed = threading.Condition()
        self._stopped = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeEngine is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/webhooks/rest/webhook"

    def start(self) -> FakeEngine:
        self._server = _Server(("127.0.0.1", 0), self)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeEngine:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- what tests read -----------------------------------------------------------------------

    @property
    def calls(self) -> list[EngineCall]:
        with self._changed:
            return list(self._calls)

    def most_in_flight(self, sender: str) -> int:
        """The most calls for `sender` the engine was ever answering at the same moment."""
        with self._changed:
            return self._most_in_flight.get(sender, 0)

    def wait_for_calls(self, count: int, timeout: float = 10.0) -> list[EngineCall]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._calls) >= count, timeout):
                raise AssertionError(f"expected {count} engine call(s) within {timeout}s, got {len(self._calls)}")
            return list(self._calls)

    # -- failure injection ---------------------------------------------------------------------

    def fail_next(self, count: int = 1, kind: str = FAIL_5XX) -> None:
        with self._changed:
            self._failures += [kind] * count

    def down(self, kind: str = FAIL_5XX) -> None:
        """Every call fails this way until `up()`."""
        with self._changed:
            self._down = kind

    def up(self) -> None:
        with self._changed:
            self._down = None
            self._failures.clear()

    # -- serving (handler threads) -------------------------------------------------------------

    def _record(self, payload: dict[str, Any]) -> str | None:
        sender = payload.get("sender", "")
        with self._changed:
            self._calls.append(EngineCall(time.time(), sender, payload.get("message", ""), payload))
            self._in_flight[sender] = self._in_flight.get(sender, 0) + 1
            self._most_in_flight[sender] = max(self._most_in_flight.get(sender, 0), self._in_flight[sender])
            self._changed.notify_all()
            if self._failures:
                return self._failures.pop(0)
            return self._down

    def _respond(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        try:
            return self._answer(payload)
        finally:
            with self._changed:
                self._in_flight[payload.get("sender", "")] -= 1

    def _answer(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        failure = self._record(payload)
        if failure == FAIL_HANG:
            self._stopped.wait(self.hang_seconds)
            return 504, b"{}"
        if self.delay:
            self._stopped.wait(self.delay)
        if failure == FAIL_5XX:
            return 503, b'{"error": "engine unavailable"}'
        if failure == FAIL_4XX:
            return 404, b'{"error": "no such webhook"}'
        if failure == FAIL_INVALID_JSON:
            return 200, b"<html>not json</html>"
        return 200, json.dumps(self.answer(payload)).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096  # a benchmark opens thousands of connections at once

    def __init__(self, address: tuple[str, int], engine: FakeEngine) -> None:
        self.engine = engine
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if len(body) < length:  # the caller died mid-request (a killed worker): nothing to answer
            self.close_connection = True
            return
        status, data = self.server.engine._respond(json.loads(body or b"{}"))
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client timed out and hung up
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class EngineProcess:
    """A FakeEngine in a process of its own (`python -m tests.support.fake_engine`), for benchmarks:
    in the benchmark's process, thousands of engine calls held open for seconds would share one GIL
    with the load generator and the Twilio stand-in, and time out there rather than in the worker."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self._popen: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> EngineProcess:
        self._popen = subprocess.Popen([sys.executable, "-m", "tests.support.fake_engine", "--delay", str(self.delay)],
                                       cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
        assert self._popen.stdout is not None
        self.url = self._popen.stdout.readline().strip()  # printed once it serves
        if not self.url.startswith("http://"):
            self._popen.kill()
            raise RuntimeError(f"the engine stand-in did not start (exit {self._popen.wait()})")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._popen is not None:
            self._popen.terminate()
            self._popen.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Rasa REST-channel engine answering 'reply to <text>'.")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    engine = FakeEngine(delay=args.delay).start()
    print(engine.url, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Event().wait()


if __name__ == "__main__":
    main()
