"""HTTP sessions for the worker's calls out (the engine, Twilio), with the environment read once.

A requests Session that trusts the environment reads the proxy variables (HTTP(S)_PROXY,
NO_PROXY), the CA bundle variables and ~/.netrc again on every request: about a tenth of the
worker's CPU per message, measured with py-spy, for answers that cannot change while the process
runs. A session made here reads them once, for the one origin it talks to, and then stops looking.

Engine sessions also hold the engine to two limits a plain session cannot: a wall-clock deadline
over the whole exchange (requests' read timeout restarts with every byte, so an engine dripping a
byte a second holds a thread for as long as it likes), and, for a bot's own engine, an
AddressPolicy checked on the addresses the connection is then made to (so DNS cannot answer one
address to the check and another to the connection).
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies, get_netrc_auth
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import NameResolutionError, NewConnectionError

from shared.netguard import AddressPolicy

# When the engine call in progress on this thread (or greenlet) must be over, on time.monotonic().
_deadline: ContextVar[float | None] = ContextVar("engine_deadline", default=None)


def read_environment_once(session: requests.Session, url: str) -> requests.Session:
    """Fix on `session` what the environment says for `url`'s origin, as requests would on each
    request (proxies unless NO_PROXY exempts the host, the CA bundle, .netrc credentials)."""
    session.proxies.update(get_environ_proxies(url))
    session.verify = _ca_bundle() or session.verify
    if session.auth is None:
        session.auth = get_netrc_auth(url)
    session.trust_env = False
    return session


def engine_session(url: str, policy: AddressPolicy | None) -> requests.Session:
    """A session for one engine origin whose calls keep to `responding_by()`. With a policy (a bot's own
    engine) it connects only to addresses the policy allows, directly: a host a bot chose gets
    neither the operator's proxy nor the machine's .netrc credentials."""
    session = requests.Session()
    adapter = EngineAdapter(policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if policy is None:
        return read_environment_once(session, url)
    session.verify = _ca_bundle() or session.verify
    session.trust_env = False
    return session


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


class EngineAdapter(HTTPAdapter):
    """Makes every connection of its pools an engine connection, under `policy` (None: trusted)."""

    def __init__(self, policy: AddressPolicy | None) -> None:
        self.policy = policy
        super().__init__()

    def get_connection_with_tls_context(self, request: requests.PreparedRequest, verify: Any,
                                        proxies: Any = None, cert: Any = None) -> HTTPConnectionPool:
        pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
        pool.ConnectionCls = _GuardedHTTPSConnection if pool.scheme == "https" else _GuardedHTTPConnection
        pool.conn_kw["address_policy"] = self.policy
        return pool


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
