"""gunicorn's gthread worker, except that a request reaches a thread only once all of it has arrived.

Stock gthread hands a connection to a thread at its first byte; the thread then blocks on the
socket until the header and the body are complete, so a client trickling either holds a thread for
as long as it likes (issue 14). Here the worker's main loop, which already polls every idle
connection, reads the request into memory as it arrives: a thread gets it whole and never waits on
the client. A request not complete `REQUEST_DEADLINE` seconds after its first byte (or its accept)
is answered 408 and closed; one larger than the app accepts goes on at once, to be refused there.
What the process holds of unfinished requests is bounded too, in bytes (`WEB_MAX_BUFFERED_BYTES`)
and in number (half of gunicorn's worker_connections, so a flood of them never stops the process
accepting): past either, the oldest unfinished requests are answered 503 and closed first, as the
likeliest to be slow on purpose. TLS and HTTP/2 (neither used behind Heroku's router) keep
gthread's own handling.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gunicorn import http
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

from webhook import MAX_BODY_BYTES

REQUEST_DEADLINE = 10.0
MAX_HEAD_BYTES = 64 * 1024
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
HEAD_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
SHED = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"
# Bytes of unfinished requests one web process holds at most: a webhook is a few KiB, while one
# connection may hold 64 KiB of head and twice MAX_BODY_BYTES of chunked body.
DEFAULT_MAX_BUFFERED_BYTES = 16 * 1024 * 1024


@dataclass
class Arrival:
    """The bytes of one request received so far, and what is known of where it ends."""

    deadline: float
    data: bytearray = field(default_factory=bytearray)
    body_start: int = -1  # after the head's blank line, once it has arrived
    length: int | None = None  # Content-Length; None while unknown or chunked
    chunk: int = -1  # chunked: where the next chunk-size line starts
    close_after: bool = False  # too large to wait for: the app refuses it, then the connection closes


class DeadlineSocket:
    """The client socket as the parser reads it: a read the buffered request did not satisfy
    (framing judged differently from gunicorn's) still ends at the request's deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = 0.0

    def recv(self, size: int) -> bytes:
        before = self.sock.gettimeout()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(remaining if before is None else min(before, remaining))
        try:
            return self.sock.recv(size)
        finally:
            self.sock.settimeout(before)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class BufferingThreadWorker(ThreadWorker):
    """gthread whose threads are handed complete requests only (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: dict[TConn, Arrival] = {}
        self.deadlines: deque[tuple[float, TConn]] = deque()  # in deadline order: all are now + the same
        self.cut_short: set[TConn] = set()  # sent on before all of it arrived: not drained, not reused
        self.buffered = 0  # bytes held in self.arrivals
        self.max_buffered = int(os.environ.get("WEB_MAX_BUFFERED_BYTES") or DEFAULT_MAX_BUFFERED_BYTES)
        self.max_unfinished = max(1, self.cfg.worker_connections // 2)

    def enqueue_req(self, conn: TConn) -> None:
        if conn.parser is None:
            if self.cfg.is_ssl or negotiation.prior_knowledge_allowed(self.cfg, conn.client):
                return super().enqueue_req(conn)
            conn.initialized = conn.data_ready = True
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.parser.unreader.sock = DeadlineSocket(conn.sock)
        arrival = Arrival(time.monotonic() + REQUEST_DEADLINE, bytearray(conn.parser.unreader.take_buffered()))
        if self._complete(conn, arrival):
            return self._dispatch(conn, arrival)
        # The poller found the socket readable (or it was just accepted): what has arrived is read now,
        # usually the whole request, rather than after another turn of the loop. The read never waits:
        # gthread's TConn makes every client socket non-blocking, and keep-alive leaves it so.
        try:
            data = conn.sock.recv(64 * 1024)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data == b"":
            return self._drop(conn, b"")
        if data:
            arrival.data += data
            if self._complete(conn, arrival):
                return self._dispatch(conn, arrival)
        self.arrivals[conn] = arrival
        self.buffered += len(arrival.data)
        self.deadlines.append((arrival.deadline, conn))
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_arrival, conn))
        self._shed_oldest()

    def on_arrival(self, conn: TConn, _sock: socket.socket) -> None:
        arrival = self.arrivals[conn]
        try:
            data = conn.sock.recv(64 * 1024)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._drop(conn, b"")
        arrival.data += data
        self.buffered += len(data)
        if self._complete(conn, arrival):
            self.poller.unregister(conn.sock)
            del self.arrivals[conn]
            self.buffered -= len(arrival.data)
            self._dispatch(conn, arrival)
        elif arrival.body_start < 0 and len(arrival.data) > MAX_HEAD_BYTES:
            self._drop(conn, HEAD_TOO_LARGE)
        else:
            self._shed_oldest()

    def _shed_oldest(self) -> None:
        """Past the process's bounds on unfinished requests, answer the oldest 503 and close them."""
        while self.deadlines and (self.buffered > self.max_buffered or len(self.arrivals) > self.max_unfinished):
            deadline, conn = self.deadlines.popleft()
            arrival = self.arrivals.get(conn)
            if arrival is not None and arrival.deadline == deadline:
                self.log.warning("Shedding an unfinished request of %d bytes: %d bytes in %d unfinished requests",
                                 len(arrival.data), self.buffered, len(self.arrivals))
                self._drop(conn, SHED)

    def _complete(self, conn: TConn, arrival: Arrival) -> bool:
        """Whether a thread may have the request: all of it is here, or waiting for more is pointless."""
        data = arrival.data
        if arrival.body_start < 0:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return False
            arrival.body_start = end + 4
            framing = _framing(bytes(data[:end]))
            if framing is None:  # a head this scan does not vouch for: the thread's parser judges it
                return True
            length, continue_expected = framing
            if continue_expected:  # the client waits for this before sending its body
                _send(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            if length is not None:
                arrival.length = length
            else:
                arrival.chunk = arrival.body_start
        body = len(data) - arrival.body_start
        if arrival.length is not None:
            arrival.close_after = arrival.length > MAX_BODY_BYTES  # the app refuses it without reading
            return arrival.close_after or body >= arrival.length
        if body > 2 * MAX_BODY_BYTES:
            arrival.close_after = True
            return True
        return self._chunks_complete(arrival)

    @staticmethod
    def _chunks_complete(arrival: Arrival) -> bool:
        """Walk the chunks received since the last call; True at the last chunk's trailer end."""
        data = arrival.data
        while True:
            line_end = data.find(b"\r\n", arrival.chunk)
            if line_end < 0:
                return False
            try:
                size = int(bytes(data[arrival.chunk:line_end]).split(b";", 1)[0].strip(b" \t"), 16)
            except ValueError:
                return True  # gunicorn's chunk parser refuses it
            if size <= 0:
                return size < 0 or data.find(b"\r\n\r\n", line_end) >= 0
            if len(data) < line_end + 2 + size + 2:
                return False
            arrival.chunk = line_end + 2 + size + 2

    def _dispatch(self, conn: TConn, arrival: Arrival) -> None:
        # The socket goes back to blocking in the thread (ThreadWorker.handle), before anything reads it.
        conn.parser.unreader.unread(bytes(arrival.data))
        conn.parser.unreader.sock.deadline = arrival.deadline
        if arrival.close_after:
            self.cut_short.add(conn)
        super().enqueue_req(conn)

    def _keepalive_after(self, conn: TConn, keepalive: bool) -> bool:
        """Runs in the request's thread; the set's add and discard are atomic under the GIL."""
        if conn in self.cut_short:
            self.cut_short.discard(conn)
            return False
        return bool(super()._keepalive_after(conn, keepalive))

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, conn = self.deadlines.popleft()
            arrival = self.arrivals.get(conn)
            if arrival is not None and arrival.deadline == deadline:
                self._drop(conn, REQUEST_TIMEOUT if arrival.data else b"")

    def _drop(self, conn: TConn, answer: bytes) -> None:
        arrival = self.arrivals.pop(conn, None)
        if arrival is not None:
            self.buffered -= len(arrival.data)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        _send(conn.sock, answer)
        self.nr_conns -= 1
        conn.close()


def _framing(head: bytes) -> tuple[int | None, bool] | None:
    """Where a request's body ends, from its head (without the blank line): (its Content-Length, or
    None when chunked; whether the client expects 100 Continue), or None for a head whose framing is
    not plain (a header line without a name, two lengths, a length and chunked, another coding).

    The main loop scans every head, so this is a scan of the three headers that frame a body, not
    gunicorn's full parse (about 40 us of the one main-loop thread per request): whatever it does
    not vouch for goes to the thread at once, whose parser answers it as gunicorn always does.
    """
    length: int | None = None
    chunked = continue_expected = False
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            return None
        name, value = name.lower(), value.strip()
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            if chunked or value.lower() != b"chunked":
                return None
            chunked = True
        elif name == b"expect":
            continue_expected = value.lower() == b"100-continue"
    if chunked:
        return (None, continue_expected) if length is None else None
    return (length or 0), continue_expected


def _send(sock: socket.socket, data: bytes) -> None:
    """A short answer, best effort: never blocks the worker's main loop."""
    if not data:
        return
    try:
        sock.setblocking(False)
        sock.send(data)
    except OSError:
        pass
