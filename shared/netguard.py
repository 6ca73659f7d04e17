"""Which addresses a bot's engine may be reached at, and which image URLs an engine may hand us.

A bot's `engine-url` comes from an API client, yet the worker calls it from inside the service's
network: unchecked, it reaches Redis, the database, a cloud's metadata service. So a bot's engine
is reached only at public addresses, checked after DNS resolution (the worker then connects to
the address it checked, see worker.http), unless ENGINE_ALLOWED_NETWORKS (or, in development,
loopback) allows it. The operator's own ENGINE_URL is trusted and never checked here.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from urllib.parse import urlsplit, urlunsplit

from shared.logging import get_logger
from shared.settings import Settings

log = get_logger(__name__)

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

_CGNAT = ip_network("100.64.0.0/10")
# Checked in order: the first that matches names the refusal in logs.
_INTERNAL: tuple[tuple[str, Callable[[Address], bool]], ...] = (
    ("unspecified", lambda a: a.is_unspecified),
    ("loopback", lambda a: a.is_loopback),
    ("link_local", lambda a: a.is_link_local),
    ("multicast", lambda a: a.is_multicast),
    ("reserved", lambda a: a.is_reserved),
    ("private", lambda a: a.is_private),
    ("cgnat", lambda a: a in _CGNAT),
    ("not_global", lambda a: not a.is_global),
)
# RFC 6761: these names are loopback whatever a resolver says.
_LOOPBACK_NAMES = ("localhost", ".localhost")


class RefusedAddress(Exception):
    """A bot's engine resolved to an address it may not be reached at; nothing was sent to it."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        super().__init__(f"{host} is {address} ({reason}): a bot's engine must be at a public address "
                         "(ENGINE_ALLOWED_NETWORKS allows private networks)")
        self.host = host
        self.address = address
        self.reason = reason


def internal_reason(address: Address) -> str | None:
    """Why `address` is not a public one (`loopback`, `private`, ...), or None when it is.

    An IPv6 address that carries an IPv4 one (::ffff:10.0.0.1, 6to4) is judged by both: a
    dual-stack socket connects ::ffff:127.0.0.1 to the IPv4 loopback.
    """
    embedded = (address.ipv4_mapped or address.sixtofour) if isinstance(address, IPv6Address) else None
    for candidate in (embedded, address):
        if candidate is None:
            continue
        for reason, matches in _INTERNAL:
            if matches(candidate):
                return reason
    return None


def spelled_address(host: str) -> Address | None:
    """The IP address a URL's host spells, however oddly (`127.1`, `0x7f000001`, `2130706433`,
    `[::1]`, `localhost`), or None for a name only DNS can answer.

    The C library reads `127.1` as 127.0.0.1 when connecting, so this reads it the same way.
    """
    host = host.strip("[]").rstrip(".").lower()
    if host == _LOOPBACK_NAMES[0] or host.endswith(_LOOPBACK_NAMES[1]):
        return IPv4Address("127.0.0.1")
    try:
        return ip_address(host)
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host):
        return None
    try:
        return IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


@dataclass(frozen=True)
class AddressPolicy:
    """Where a bot's engine may be reached: public addresses, plus ENGINE_ALLOWED_NETWORKS, plus
    loopback in development (where `mammut-sms dev` and the tests run their engines)."""

    allowed_networks: tuple[Network, ...] = ()
    allow_loopback: bool = False

    @classmethod
    def for_settings(cls, settings: Settings) -> AddressPolicy:
        return cls(settings.engine_allowed_networks, settings.development)

    def refusal(self, address: Address) -> str | None:
        """Why the policy keeps an engine from `address`, or None."""
        reason = internal_reason(address)
        if reason is None or (reason == "loopback" and self.allow_loopback):
            return None
        if any(address.version == network.version and address in network for network in self.allowed_networks):
            return None
        return reason

    def resolve(self, host: str, port: int) -> list[str]:
        """Every address `host` resolves to, checked: one refused address refuses the host, so a
        name that also points inside cannot be used to get there on a second try."""
        spelled = spelled_address(host)
        if spelled is not None:
            self._check(host, spelled)  # `localhost`, `127.1`: refused before any resolver is asked
        addresses = list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
        for address in addresses:
            self._check(host, ip_address(address))
        return addresses

    def _check(self, host: str, address: Address) -> None:
        reason = self.refusal(address)
        if reason is not None:
            raise RefusedAddress(host, str(address), reason)


def without_credentials(url: str) -> str:
    """`url` without its `user:password@`: a bot's engine never gets credentials from the URL
    (the registry refuses them; a URL stored earlier may still carry them)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# An image URL an operator may send: https at a named host (a letter TLD), no port or credentials.
# The API's schema states it (webhook.openapi), and the server holds it before media_refusal.
PUBLIC_HTTPS_URL = re.compile(r"^https://[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,63}(/[!-~]*)?$")


def media_refusal(url: str, *, development: bool) -> str | None:
    """Why Twilio may not be asked to fetch an engine's image URL, or None.

    Only https (and http in development): not javascript:, file: or data:, no credentials, and
    no literal internal address (Twilio fetches from outside; such a URL is a probe, not an image).
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in (("https", "http") if development else ("https",)):
        return f"scheme_{parts.scheme or 'missing'}"
    if not parts.hostname:
        return "no_host"
    if "@" in parts.netloc:
        return "credentials"
    address = spelled_address(parts.hostname)
    return internal_reason(address) if address is not None else None


def allowed_media(url: str | None, *, development: bool, **context: object) -> str | None:
    """`url` when it may be sent as an MMS image, else None, logged as `engine.media_refused`:
    the reply's text still goes."""
    if url is None:
        return None
    reason = media_refusal(url, development=development)
    if reason is None:
        return url
    log.warning("engine.media_refused", image=url, reason=reason, **context)
    return None
