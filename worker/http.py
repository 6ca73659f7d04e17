"""HTTP for the worker's calls out (the engine, Twilio): urllib3 connection pools, one per origin,
shared by the process's threads, with the environment read once.

The worker makes two calls per message, to origins fixed for the life of the process. Through
requests each call also built and merged a Session's settings, hooks and cookies, and re-read the
proxy and CA variables: about 0.5 ms of CPU per call on the benchmark machine (`bench/e2e.py`),
a sixth of the worker's whole cost per message. An Origin asks urllib3, which requests itself
sends through, directly: what requests would have read from the environment (proxies unless
NO_PROXY exempts the host, the CA bundle, credentials in the URL or ~/.netrc) is read when the
origin is first used, and its pool holds up to a connection per thread, waiting when all are busy.

Engine calls are also held to two limits requests cannot give: a wall-clock deadline over the
whole exchange (a read timeout restarts with every byte, so an engine dripping a byte a second
holds a thread for as long as it likes), and, for a bot's own engine, an AddressPolicy checked on
the addresses the connection is then made to (so DNS cannot answer one address to the check and
another to the connection).
"""

from __future__ import annotations

import base64
import io
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote, urlsplit

import certifi
import urllib3
from requests.utils import get_environ_proxies, get_netrc_auth
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import connection_from_url
from urllib3.exceptions import NameResolutionError, NewConnectionError

from shared.netguard import AddressPolicy
from shared.redis import process_threads

# When the engine call in progress on this thread (or greenlet) must be over, on time.monotonic().
_deadline: ContextVar[float | None] = ContextVar("engine_deadline", default=None)
# A thread finding every connection of an origin in use waits this long for one (with a
# connection per thread it never has to: this bounds the wait if that ever stops being true).
POOL_TIMEOUT_SECONDS = 30.0


class Origin:
    """One scheme://host:port's connections, shared by the process's threads (urllib3's pools are
    thread-safe): at most `size` open at once (default: the process's threads), kept alive between
    calls. With a policy (a bot's own engine) connections go only to addresses the policy allows,
    directly: a host a bot chose gets neither the operator's proxy nor the machine's .netrc
    credentials, nor credentials from its URL. Without one (the operator's ENGINE_URL, Twilio) the
    environment applies as requests would apply it."""

    def __init__(self, url: str, policy: AddressPolicy | None = None, size: int | None = None) -> None:
        parts = urlsplit(url)
        https = parts.scheme == "https"
        size = size or process_threads()
        tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED", "ca_certs": _ca_bundle() or certifi.where()} if https else {}
        proxy = None if policy is not None else get_environ_proxies(url).get(parts.scheme)
        self._proxied: urllib3.ProxyManager | None = None
        if proxy:
            # The proxy's own user:password@ goes as Proxy-Authorization, as requests sends it.
            proxy_auth = _basic_credentials(proxy, netrc=False)
            self._proxied = urllib3.ProxyManager(proxy, num_pools=1, maxsize=size, block=True,
                                                 proxy_headers={"Proxy-Authorization": proxy_auth} if proxy_auth else None,
                                                 **tls)
            pool = self._proxied.connection_from_url(url)
        else:
            pool = connection_from_url(url, maxsize=size, block=True, **tls)
        pool.ConnectionCls = _GuardedHTTPSConnection if https else _GuardedHTTPConnection  # type: ignore[assignment]
        pool.conn_kw["address_policy"] = policy
        self._pool = pool
        self.authorization = None if policy is not None else _basic_credentials(url)

    def request(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str],
                timeout: urllib3.Timeout, stream: bool = False) -> urllib3.BaseHTTPResponse:
        """One request, never retried and never redirected (a 3xx is the answer); a streamed response
        holds its connection (see `streaming`). Raises urllib3's errors: TimeoutError for timeouts,
        HTTPError for the rest."""
        if self.authorization and "Authorization" not in headers:
            headers = {**headers, "Authorization": self.authorization}
        options: dict[str, Any] = {"body": body, "headers": headers, "retries": False, "redirect": False,
                                   "timeout": timeout, "preload_content": not stream,
                                   "pool_timeout": POOL_TIMEOUT_SECONDS}
        if self._proxied is not None:
            return self._proxied.urlopen(method, url, **options)
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return self._pool.urlopen(method, target, assert_same_host=False, **options)

    @contextmanager
    def streaming(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str],
                  timeout: urllib3.Timeout) -> Iterator[urllib3.BaseHTTPResponse]:
        """`request`, its response read inside the block. Its connection goes back to the pool for
        the next call when the block ends normally (the answer read to its end); when it raises
        (too large, too slow), it is closed: what is left must not be read as the next answer."""
        response = self.request(method, url, body, headers, timeout, stream=True)
        try:
            yield response
        except BaseException:
            response.close()
            raise
        finally:
            response.release_conn()


_origins: dict[tuple[str, str, int | None, AddressPolicy | None, str], Origin] = {}
_origins_lock = threading.Lock()


def origin(url: str, policy: AddressPolicy | None = None) -> Origin:
    """The process's Origin for `url`'s scheme, host, port and credentials under `policy`, made on
    first use."""
    parts = urlsplit(url)
    key = (parts.scheme, (parts.hostname or "").lower(), parts.port, policy, parts.netloc.rpartition("@")[0])
    found = _origins.get(key)
    if found is None:
        with _origins_lock:
            found = _origins.get(key)
            if found is None:
                found = _origins[key] = Origin(url, policy)
    return found


def _basic_credentials(url: str, netrc: bool = True) -> str | None:
    """The Basic credentials requests would send for `url`: its user:password@, else ~/.netrc's."""
    parts = urlsplit(url)
    if parts.username:
        pair: tuple[str, str] | None = (unquote(parts.username), unquote(parts.password or ""))
    else:
        pair = get_netrc_auth(url) if netrc else None
    if not pair:
        return None
    return "Basic " + base64.b64encode(f"{pair[0]}:{pair[1]}".encode()).decode("ascii")


@contextmanager
def responding_by(at: float) -> Iterator[None]:
    """Engine responses read inside this block (headers and body, however slowly they come) fail
    with a read timeout once time.monotonic() passes `at`."""
    token = _deadline.set(at)
    try:
        yield
    finally:
        _deadline.reset(token)


def _ca_bundle() -> str | None:
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")


class _GuardedMixin:
    """Connects to the addresses its policy checked, and reads responses by the deadline. The host
    name stays the connection's host, so the Host header, TLS SNI and the certificate check use it."""

    _dns_host: str
    port: int
    sock: Any

    def __init__(self, *args: Any, address_policy: AddressPolicy | None = None, **kwargs: Any) -> None:
        self.address_policy = address_policy
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        if self.address_policy is None:
            return super()._new_conn()  # type: ignore[misc]
        host = self._dns_host
        try:
            addresses = self.address_policy.resolve(host, self.port)
        except socket.gaierror as error:
            raise NameResolutionError(host, self, error) from error  # type: ignore[arg-type]
        failure: NewConnectionError | None = None
        try:
            for address in addresses:
                self._dns_host = address
                try:
                    return super()._new_conn()  # type: ignore[misc]
                except NewConnectionError as error:
                    failure = error
        finally:
            self._dns_host = host
        assert failure is not None
        raise failure

    def getresponse(self) -> Any:
        at = _deadline.get()
        if at is None:
            return super().getresponse()  # type: ignore[misc]
        plain = self.sock
        wrapped = self.sock = _DeadlineSocket(plain, at)
        try:
            return super().getresponse()  # type: ignore[misc]
        finally:
            if self.sock is wrapped:  # http.client drops the socket when the response owns it
                self.sock = plain


class _GuardedHTTPConnection(_GuardedMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedMixin, HTTPSConnection):
    pass


class _DeadlineSocket:
    """The connection's socket as http.client reads a response from it: through a reader that
    waits no later than the deadline."""

    def __init__(self, sock: Any, at: float) -> None:
        self._sock = sock
        self._at = at

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._at))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _DeadlineReader(io.RawIOBase):
    """Each read waits at most until the deadline (and at most the read timeout), so no rate of
    dripping bytes keeps it alive past the deadline."""

    def __init__(self, sock: Any, at: float) -> None:
        super().__init__()
        self._raw = sock.makefile("rb", buffering=0)
        self._sock = sock
        self._at = at
        self._timeout = sock.gettimeout()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        remaining = self._at - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the engine's deadline passed")
        self._sock.settimeout(remaining if self._timeout is None else min(remaining, self._timeout))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()
