"""Slow clients (a header or a body trickled a byte a second) against the Procfile's real web process.

Issue 14: such connections, unauthenticated, held every gunicorn thread of a web dyno for minutes,
and Twilio's webhooks went unanswered. They must neither hold a thread nor stay open long.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from twilio.request_validator import RequestValidator

from shared.bots import Bot
from tests.conftest import BOT_ACCOUNT_SID, BOT_AUTH_TOKEN, BOT_NUMBER, free_port
from tests.support.processes import Process, start_web

WEB_CONCURRENCY, WEB_THREADS = 2, 4
# Three times the web's threads: under a worker that gives each a thread, the rest queue behind them.
SLOW_CLIENTS = 3 * WEB_CONCURRENCY * WEB_THREADS
# webhook/slowclient.py's REQUEST_DEADLINE (not imported: the test must run against any gunicorn.conf.py).
REQUEST_DEADLINE = 10.0
PROMPT = 2.0  # seconds a normal request may take while the slow clients are connected

# (sent at once, then trickled a byte a second): neither ever finishes within the test.
SLOW_HEADER = (b"", b"POST /channels/sms/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200)
SLOW_BODY = (b"POST /channels/sms/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 200\r\n\r\n", b"a" * 200)


class SlowClients:
    """Connections that send `opening`, then `trickle` a byte a second; each records when the server closed it."""

    def __init__(self, port: int, opening: bytes, trickle: bytes, count: int) -> None:
        self.data = trickle
        self.sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        for sock in self.sockets:
            sock.sendall(opening)
        self.sent = [0] * count
        self.closed_at: dict[int, float] = {}
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        while not self._stop.is_set():
            for index, sock in enumerate(self.sockets):
                if index not in self.closed_at and self.sent[index] < len(self.data):
                    try:
                        sock.send(self.data[self.sent[index]:self.sent[index] + 1])
                        self.sent[index] += 1
                    except OSError:
                        self.closed_at.setdefault(index, time.monotonic())
            self._watch(until=time.monotonic() + 1.0)

    def _watch(self, until: float) -> None:
        """Note the connections the server closed (EOF or reset; a 408 before it is read past)."""
        while (remaining := until - time.monotonic()) > 0 and not self._stop.is_set():
            open_ = [sock for index, sock in enumerate(self.sockets) if index not in self.closed_at]
            if not open_:
                self._stop.wait(remaining)
                return
            readable, _, _ = select.select(open_, [], [], remaining)
            for sock in readable:
                try:
                    ended = not sock.recv(4096)
                except OSError:
                    ended = True
                if ended:
                    self.closed_at.setdefault(self.sockets.index(sock), time.monotonic())

    @property
    def open_count(self) -> int:
        return len(self.sockets) - len(self.closed_at)

    def wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.open_count and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            sock.close()


@pytest.fixture(scope="module")
def web(worker_env: dict[str, str]) -> Iterator[tuple[Process, str]]:
    """The Procfile's web process with the default 2 processes x 4 threads."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**worker_env, "WEB_CONCURRENCY": str(WEB_CONCURRENCY), "WEB_THREADS": str(WEB_THREADS),
           "PUBLIC_URL": base, "LOG_LEVEL": "INFO"}
    with start_web(env, port) as process:
        yield process, base


def signed_text(base: str, number: int) -> requests.Response:
    """An inbound SMS to the test bot, signed as Twilio signs it."""
    url = base + "/channels/sms/"
    form = {"MessageSid": f"SM{time.time_ns():024x}{number:08d}", "AccountSid": BOT_ACCOUNT_SID,
            "From": "+15551230000", "To": BOT_NUMBER, "Body": "hello", "NumMedia": "0"}
    signature = RequestValidator(BOT_AUTH_TOKEN).compute_signature(url, form)
    return requests.post(url, data=form, headers={"X-Twilio-Signature": signature}, timeout=PROMPT)


def assert_answered_promptly_then_closed(web: tuple[Process, str], slow: SlowClients) -> None:
    _, base = web
    # Given slow clients on more connections than the web has threads, all in flight
    time.sleep(1.5)
    assert SLOW_CLIENTS == slow.open_count
    # When Twilio posts a webhook and a monitor checks health, on fresh connections
    for number in range(4):
        started = time.monotonic()
        answer = signed_text(base, number)
        health = requests.get(base + "/healthz", timeout=PROMPT)
        # Then each is answered in time
        assert (200, 200) == (answer.status_code, health.status_code)
        assert time.monotonic() - started < PROMPT
    assert SLOW_CLIENTS == slow.open_count
    # And every slow connection is closed by the server at the deadline
    slow.wait_closed(timeout=REQUEST_DEADLINE + 1.5 - (time.monotonic() - slow.started))
    assert 0 == slow.open_count
    assert all(at - slow.started <= REQUEST_DEADLINE + 1.5 for at in slow.closed_at.values())


def test_slow_headers_neither_starve_webhooks_nor_outlive_the_deadline(web: tuple[Process, str], bot: Bot) -> None:
    """Connections trickling an unfinished header a byte a second hold no request thread."""
    slow = SlowClients(int(web[1].rsplit(":", 1)[1]), *SLOW_HEADER, count=SLOW_CLIENTS)
    try:
        assert_answered_promptly_then_closed(web, slow)
    finally:
        slow.close()


def test_slow_bodies_neither_starve_webhooks_nor_outlive_the_deadline(web: tuple[Process, str], bot: Bot) -> None:
    """Connections with a complete header and a body trickled a byte a second hold no request thread."""
    slow = SlowClients(int(web[1].rsplit(":", 1)[1]), *SLOW_BODY, count=SLOW_CLIENTS)
    try:
        assert_answered_promptly_then_closed(web, slow)
    finally:
        slow.close()


def answer_before_close(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sent on `sock` until it closed it (or `timeout` passed)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def test_a_request_past_the_deadline_is_told_408_before_it_is_closed(web: tuple[Process, str], bot: Bot) -> None:
    """A header left unfinished gets `408 Request Timeout` at the deadline, not a bare close."""
    with socket.create_connection(("127.0.0.1", int(web[1].rsplit(":", 1)[1]))) as sock:
        sock.sendall(SLOW_HEADER[1])
        answer = answer_before_close(sock, timeout=REQUEST_DEADLINE + 5)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_a_head_over_64_kib_is_told_431_before_it_is_closed(web: tuple[Process, str], bot: Bot) -> None:
    """A head that grows past 64 KiB without ending is answered `431` at once, without waiting for the deadline."""
    opening = b"POST /channels/sms/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: "
    with socket.create_connection(("127.0.0.1", int(web[1].rsplit(":", 1)[1]))) as sock:
        sock.sendall(opening + b"a" * (64 * 1024 + 100 - len(opening)))
        answer = answer_before_close(sock, timeout=REQUEST_DEADLINE / 2)
    assert answer.startswith(b"HTTP/1.1 431 "), answer


# A web process with small bounds, so a test reaches them with a few dozen connections.
SMALL_BUFFER_BYTES, SMALL_CONNECTIONS = 512 * 1024, 40
UNFINISHED_HEAD = b"POST /channels/sms/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 60_000


@pytest.fixture
def small_web(worker_env: dict[str, str]) -> Iterator[tuple[Process, str]]:
    """One web process of 4 threads, 40 connections (so 20 unfinished requests) and 512 KiB for them."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**worker_env, "WEB_CONCURRENCY": "1", "WEB_THREADS": str(WEB_THREADS), "PUBLIC_URL": base,
           "LOG_LEVEL": "INFO", "WEB_MAX_BUFFERED_BYTES": str(SMALL_BUFFER_BYTES),
           "GUNICORN_CMD_ARGS": f"--worker-connections {SMALL_CONNECTIONS}"}
    with start_web(env, port) as process:
        yield process, base


def open_one_by_one(port: int, opening: bytes, count: int) -> list[socket.socket]:
    """Connections sending `opening` and nothing more, each after the last was taken in (oldest first)."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(opening)
        sockets.append(sock)
        time.sleep(0.02)
    return sockets


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        return False
    try:
        return sock.recv(4096) is not None  # an answer (503) or EOF: the server is done with it
    except OSError:
        return True


def test_unfinished_requests_past_the_processs_byte_bound_are_shed_oldest_first(
        small_web: tuple[Process, str], bot: Bot) -> None:
    """15 unfinished 60 KB heads (fewer than the 20 unfinished requests allowed) against a 512 KiB bound:
    the oldest are closed, the newest kept, a webhook answered."""
    _, base = small_web
    sockets = open_one_by_one(int(base.rsplit(":", 1)[1]), UNFINISHED_HEAD, 15)
    try:
        time.sleep(1.0)
        answered, _, _ = select.select(sockets, [], [], 0.5)  # well before the 10 s deadline closes the rest
        shed = [sock in answered for sock in sockets]
        # The process holds no more than its bound of them: the first ones went, the last stayed
        kept = shed.count(False)
        assert 0 < kept and kept * len(UNFINISHED_HEAD) <= SMALL_BUFFER_BYTES
        assert shed == sorted(shed, reverse=True)  # all the shed ones came before all the kept ones
        assert 200 == signed_text(base, 1).status_code
    finally:
        for sock in sockets:
            sock.close()


def test_a_flood_of_request_lines_never_stops_the_process_accepting_webhooks(
        small_web: tuple[Process, str], bot: Bot) -> None:
    """More request-line-only connections than gunicorn's worker_connections: a signed webhook is still answered."""
    _, base = small_web
    sockets = open_one_by_one(int(base.rsplit(":", 1)[1]), b"POST /channels/sms/ HTTP/1.1\r\n",
                              SMALL_CONNECTIONS + 10)
    try:
        time.sleep(0.5)
        assert 200 == signed_text(base, 2).status_code
        assert closed_by_server(sockets[0])  # the oldest made room
    finally:
        for sock in sockets:
            sock.close()


def test_a_client_that_expects_100_continue_is_told_to_go_on_then_answered(web: tuple[Process, str], bot: Bot) -> None:
    """A client holding its body until the server says 100 Continue (curl does for large bodies) is told
    so by the main loop, then sends it and gets its answer: it never waits out the deadline."""
    _, base = web
    port = int(base.rsplit(":", 1)[1])
    body = b"MessageSid=SM1&From=%2B15551230000&To=%2B15005550006&Body=hola"
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_DEADLINE / 2) as client:
        client.sendall(b"POST /channels/sms/ HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                       b"Content-Type: application/x-www-form-urlencoded\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        assert client.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        client.sendall(body)
        answer = b""
        while b"HTTP/1.1 403 " not in answer and (more := client.recv(4096)):
            answer += more
    # Any number of interim 100s may come first (RFC 9110 15.2): gunicorn's own parser sends one too.
    final = answer.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")
    assert final.startswith(b"HTTP/1.1 403 "), answer[:200]  # unsigned: refused, at once


# --- How the worker's main loop reads a head's framing (webhook.slowclient._framing) ---------

HEAD = b"POST /channels/sms/ HTTP/1.1\r\nHost: 127.0.0.1"


@pytest.mark.parametrize(("headers", "framing"), [
    (b"", (0, False)),  # no body
    (b"\r\nContent-Length: 412", (412, False)),
    (b"\r\ncontent-length:  7 \r\nEXPECT: 100-Continue", (7, True)),
    (b"\r\nTransfer-Encoding: chunked", (None, False)),
    (b"\r\nTransfer-Encoding: Chunked\r\nExpect: 100-continue", (None, True)),
    # Not plain: the thread's parser judges these at once, as gunicorn always has.
    (b"\r\nContent-Length: 4\r\nContent-Length: 5", None),
    (b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked", None),
    (b"\r\nTransfer-Encoding: gzip, chunked", None),
    (b"\r\nContent-Length: -1", None),
    (b"\r\nContent-Length: 0x10", None),
    (b"\r\nContent-Length : 4", None),
    (b"\r\nno colon here", None),
])
def test_the_main_loop_reads_where_a_body_ends_from_three_headers(headers: bytes,
                                                                  framing: tuple[int | None, bool] | None) -> None:
    """Content-Length, chunked, 100-continue; any other framing is left to gunicorn's parser."""
    from webhook.slowclient import _framing

    assert framing == _framing(HEAD + headers)


def test_connections_that_send_nothing_never_hold_up_the_main_loop(web: tuple[Process, str], bot: Bot) -> None:
    """Clients that connect and stay silent: the main loop reads only what has arrived, never waits
    on them, so a webhook on another connection is answered at once; and one that connects and
    closes at once leaves nothing behind."""
    _, base = web
    port = int(base.rsplit(":", 1)[1])
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2 * WEB_CONCURRENCY)]
    for _ in range(2 * WEB_CONCURRENCY):
        socket.create_connection(("127.0.0.1", port)).close()
    try:
        time.sleep(0.3)
        for number in range(4):
            started = time.monotonic()
            assert 200 == signed_text(base, 100 + number).status_code
            assert time.monotonic() - started < PROMPT
    finally:
        for sock in silent:
            sock.close()
