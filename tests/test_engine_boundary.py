"""The engine is code the service does not control: what a bot's engine may reach, how long a call
may take, how much of an answer is read, and which images it may hand to Twilio.

Everything here goes through real HTTP to servers on this machine's loopback, which is exactly
where a bot's engine must not reach unless the operator allows it.
"""

from __future__ import annotations

import base64

import dataclasses
import json
import datetime
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask.testing import FlaskClient

from shared.bots import Bot, BotStore
from shared.netguard import AddressPolicy, internal_reason, media_refusal, spelled_address
from shared.settings import PRODUCTION, Settings, SettingsError
from tests.support.fake_engine import FakeEngine
from tests.test_engine import inbound
from tests.test_engine_callback import queued
from tests.test_registry import USERS, seed_body
from worker.engine import Answer, HttpEngine, engine_for, parse_answers

FALLBACK = "Estamos con problemas, intenta luego."
ANSWER = b'[{"recipient_id": "+15551230001", "text": "hola"}]'
NOWHERE = AddressPolicy()  # production: public addresses only
LOOPBACK = AddressPolicy((ip_network("127.0.0.0/8"), ip_network("::1/128")))

Respond = Callable[["_Handler"], None]


class Server:
    """A local HTTP server: `respond` writes every answer; it records each request it got."""

    def __init__(self, respond: Respond, host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.hung_up = threading.Event()  # the client closed the connection while we were writing
        self._http = _Http((host, port), self)
        self.port = self._http.server_address[1]
        self.scheme = "https" if tls else "http"
        if tls:
            self._http.socket = tls.wrap_socket(self._http.socket, server_side=True)

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def url(self, host: str = "127.0.0.1", path: str = "/engine") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


class _Http(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], server: Server) -> None:
        self.owner = server
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Http

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.owner.requests.append((self.path, dict(self.headers)))
        try:
            self.server.owner.respond(self)
        except OSError:
            self.server.owner.hung_up.set()
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serving(respond: Respond, host: str = "127.0.0.1", port: int = 0,
            tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    server = Server(respond, host, port, tls)
    thread = threading.Thread(target=server._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server._http.shutdown()
        server._http.server_close()


def answers_json(handler: _Handler, body: bytes = ANSWER) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for `name` (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_path, key_path = directory / "engine.pem", directory / "engine.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return certificate_path, key_path


def guarded(url: str, policy: AddressPolicy | None = NOWHERE, **options: Any) -> HttpEngine:
    """A bot's engine under `policy`, with short timeouts so a failing call takes a second at most."""
    defaults: dict[str, Any] = {"deadline": 3.0, "read_timeout": 1.0, "backoff": (0.05, 0.05)}
    return HttpEngine(url, policy=policy, **{**defaults, **options})


def outcomes(logs: list[dict[str, Any]]) -> list[str]:
    return [str(entry["outcome"]) for entry in logs if entry["event"] == "engine.called"]


@pytest.fixture
def unlucky(bot: Bot) -> Bot:
    """A bot whose fallback message shows when its engine failed."""
    return dataclasses.replace(bot, fallback_message=FALLBACK)


class TestAddresses:
    """A bot's engine-url reaches only public addresses, checked after resolution, unless allowed."""

    def test_an_engine_on_loopback_is_refused_without_being_contacted(
            self, unlucky: Bot, redis: redis_lib.Redis, logs: list[dict[str, Any]]) -> None:
        """Outside development, 127.0.0.1 is refused before any connection: the fallback goes, once."""
        with serving(answers_json) as server:
            answers = guarded(server.url()).answer(unlucky, inbound(unlucky))

        assert [Answer(FALLBACK)] == answers
        assert [] == server.requests
        assert ["refused_address"] == outcomes(logs)  # not retried
        [refused] = [entry for entry in logs if entry["event"] == "engine.refused_address"]
        assert ("127.0.0.1", "loopback") == (refused["address"], refused["reason"])

    @pytest.mark.parametrize("host", ["localhost", "0x7f000001", "2130706433", "127.1", "0177.0.0.1",
                                      "[::1]", "[::ffff:127.0.0.1]", "127.0.0.1."])
    def test_every_spelling_of_loopback_is_refused(self, host: str, unlucky: Bot, redis: redis_lib.Redis,
                                                   logs: list[dict[str, Any]]) -> None:
        """Names that resolve to loopback and odd numeric spellings are judged by the address they reach."""
        with serving(answers_json) as server:
            answers = guarded(server.url(host)).answer(unlucky, inbound(unlucky))

        assert ([Answer(FALLBACK)], []) == (answers, server.requests)
        assert ["refused_address"] == outcomes(logs)

    @pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
                                     "http://10.0.0.1:6379/", "http://100.64.0.1/", "http://0.0.0.0:5432/",
                                     "http://[::]/", "http://224.0.0.1/"])
    def test_internal_addresses_are_refused_at_once(self, url: str, unlucky: Bot, redis: redis_lib.Redis,
                                                    logs: list[dict[str, Any]]) -> None:
        """Metadata services, private, CGNAT, unspecified and multicast addresses are never tried."""
        started = time.monotonic()

        answers = guarded(url, connect_timeout=2.0).answer(unlucky, inbound(unlucky))

        assert [Answer(FALLBACK)] == answers
        assert ["refused_address"] == outcomes(logs)
        assert time.monotonic() - started < 0.5

    def test_allowed_networks_let_a_bot_reach_a_private_engine(self, bot: Bot, redis: redis_lib.Redis) -> None:
        """ENGINE_ALLOWED_NETWORKS=127.0.0.0/8 lets a bot's engine on loopback answer."""
        with serving(answers_json) as server:
            answers = guarded(server.url("localhost"), LOOPBACK).answer(bot, inbound(bot))

        assert [Answer("hola")] == answers
        assert ["/engine"] == server.paths

    def test_engine_for_guards_a_bots_engine_url_but_trusts_engine_url(
            self, bot: Bot, settings: Settings, engine: FakeEngine, redis: redis_lib.Redis) -> None:
        """In production a bot's engine on loopback is refused, unless ENGINE_ALLOWED_NETWORKS allows
        it; the operator's ENGINE_URL on loopback is used as it is."""
        production = settings.with_overrides(environment=PRODUCTION)
        own = dataclasses.replace(bot, engine_url=engine.url, fallback_message=FALLBACK)
        allowed = production.with_overrides(engine_allowed_networks=(ip_network("127.0.0.0/8"),))
        trusted = production.with_overrides(engine_url=engine.url)

        refused = engine_for(own, production).answer(own, inbound(own))
        let_in = engine_for(own, allowed).answer(own, inbound(own))
        operators = engine_for(bot, trusted).answer(bot, inbound(bot))

        assert [Answer(FALLBACK), Answer("reply to hola"), Answer("reply to hola")] == [*refused, *let_in, *operators]
        assert 2 == len(engine.calls)

    def test_the_connection_goes_to_the_address_that_was_checked(
            self, bot: Bot, redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        """DNS rebinding: a name that resolves to an allowed address for the check and to another
        address afterwards is still reached at the checked one."""
        # Given a name that resolves to 127.0.0.1 (allowed) once, then to 127.0.0.2 (not allowed),
        # and a server on each at the same port
        resolved: list[str] = []
        resolve = socket.getaddrinfo

        def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host == "rebind.test":
                host = "127.0.0.2" if resolved else "127.0.0.1"
                resolved.append(host)
            return resolve(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        with serving(answers_json) as checked, serving(answers_json, "127.0.0.2", checked.port) as inside:
            # When the bot's engine is called by that name
            policy = AddressPolicy((ip_network("127.0.0.1/32"),))
            answers = guarded(checked.url("rebind.test"), policy).answer(bot, inbound(bot))

        # Then the call went to the checked address, with the name in its Host header
        assert [Answer("hola")] == answers
        assert f"rebind.test:{checked.port}" == checked.requests[0][1]["Host"]
        assert [] == inside.requests

    def test_a_name_with_one_refused_address_among_its_answers_is_refused(
            self, unlucky: Bot, redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch,
            logs: list[dict[str, Any]]) -> None:
        """Every address DNS gives is checked, not only the first: a name resolving to an allowed address
        that refuses connections and then to an inside one is refused, though the HTTP layer would fall
        back to the second."""
        with serving(answers_json, "127.0.0.2") as inside:
            # Given a name resolving to 127.0.0.1 (allowed, nothing listening) and 127.0.0.2 (inside, listening)
            resolve = socket.getaddrinfo

            def split(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
                if host != "split.test":
                    return resolve(host, port, *args, **kwargs)
                return [*resolve("127.0.0.1", port, *args, **kwargs), *resolve("127.0.0.2", port, *args, **kwargs)]

            monkeypatch.setattr(socket, "getaddrinfo", split)
            # When the bot's engine is called by that name
            answers = guarded(inside.url("split.test"), AddressPolicy((ip_network("127.0.0.1/32"),))).answer(
                unlucky, inbound(unlucky))

        # Then nothing reached the inside address: the fallback goes, once
        assert ([Answer(FALLBACK)], []) == (answers, inside.requests)
        [refused] = [entry for entry in logs if entry["event"] == "engine.refused_address"]
        assert "127.0.0.2" == refused["address"]

    @pytest.mark.parametrize("name, answered", [("engine.test", True), ("impostor.test", False)])
    def test_tls_is_checked_against_the_name_while_connecting_to_the_checked_address(
            self, name: str, answered: bool, bot: Bot, redis: redis_lib.Redis, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """Pinning the address keeps https whole: SNI and the certificate check use the URL's name."""
        # Given an https engine whose certificate names engine.test, and two names resolving to it
        certificate, key = self_signed(tmp_path, "engine.test")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
        resolve = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: resolve(
            "127.0.0.1" if host in ("engine.test", "impostor.test") else host, *args, **kwargs))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certificate, key)

        with serving(answers_json, tls=context) as server:
            # When the bot's engine is called by each name
            answers = guarded(server.url(name), LOOPBACK, backoff=()).answer(bot, inbound(bot))

        # Then the certificate's own name is answered, and another name is refused by TLS
        assert ([Answer("hola")] if answered else []) == answers

    def test_credentials_in_a_stored_engine_url_are_never_sent(self, bot: Bot, redis: redis_lib.Redis) -> None:
        """user:password@ in a bot's engine-url (stored before the registry refused it) is stripped."""
        with serving(answers_json) as server:
            url = server.url().replace("http://", "http://rasa:s3cret@")
            answers = guarded(url, LOOPBACK).answer(bot, inbound(bot))

        assert [Answer("hola")] == answers
        assert "Authorization" not in server.requests[0][1]


class TestTheEnvironment:
    """The operator's engine gets what requests would have taken from the environment (a proxy
    unless NO_PROXY exempts it, credentials in its URL); a bot's own engine gets none of it."""

    def test_the_operators_engine_goes_through_the_proxy_unless_no_proxy_exempts_it(
            self, bot: Bot, redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        with serving(answers_json) as proxy, serving(answers_json) as exempt:
            # Given a proxy in the environment (with its credentials), and an engine host NO_PROXY exempts
            monkeypatch.setenv("HTTP_PROXY", proxy.url(path="").replace("http://", "http://corp:pw@"))
            monkeypatch.setenv("NO_PROXY", "localhost")

            # When the operator's engine is called by a proxied name and by an exempt one
            proxied = HttpEngine("http://engine.invalid:8080/webhook", backoff=()).answer(bot, inbound(bot))
            direct = HttpEngine(exempt.url("localhost"), backoff=()).answer(bot, inbound(bot))

        # Then the first went to the proxy (the absolute URL is the proxy's request target), the second straight
        assert [Answer("hola")] == proxied == direct
        assert ["http://engine.invalid:8080/webhook"] == [path for path, _ in proxy.requests]
        assert "Basic " + base64.b64encode(b"corp:pw").decode() == proxy.requests[0][1]["Proxy-Authorization"]
        assert ["/engine"] == [path for path, _ in exempt.requests]

    def test_a_bots_own_engine_never_goes_through_the_operators_proxy(
            self, bot: Bot, redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        with serving(answers_json) as proxy, serving(answers_json) as engine:
            monkeypatch.setenv("HTTP_PROXY", proxy.url(path=""))
            monkeypatch.setenv("NO_PROXY", "")

            answers = guarded(engine.url(), LOOPBACK).answer(bot, inbound(bot))

        assert [Answer("hola")] == answers
        assert [] == proxy.requests and 1 == len(engine.requests)

    def test_credentials_in_the_operators_engine_url_are_sent_as_basic_auth(
            self, bot: Bot, redis: redis_lib.Redis) -> None:
        with serving(answers_json) as server:
            url = server.url().replace("http://", "http://rasa:s%40cret@")

            HttpEngine(url, backoff=()).answer(bot, inbound(bot))

        assert "Basic " + base64.b64encode(b"rasa:s@cret").decode() == server.requests[0][1]["Authorization"]

    def test_two_engine_urls_on_one_server_each_send_their_own_credentials(
            self, bot: Bot, redis: redis_lib.Redis) -> None:
        with serving(answers_json) as server:
            for user in ("ana", "beto"):
                HttpEngine(server.url().replace("http://", f"http://{user}:pw@"), backoff=()).answer(bot, inbound(bot))

        assert ["Basic " + base64.b64encode(f"{user}:pw".encode()).decode() for user in ("ana", "beto")] == [
            headers["Authorization"] for _, headers in server.requests]


class TestRedirects:
    """An engine's redirect is an engine error, never followed (it could point inside)."""

    @pytest.mark.parametrize("status, location", [(307, "/internal"), (302, "/moved"),
                                                  (307, "http://169.254.169.254/latest/meta-data/")])
    def test_a_redirect_is_not_followed(self, status: int, location: str, unlucky: Bot, redis: redis_lib.Redis,
                                        logs: list[dict[str, Any]]) -> None:
        """One request, no second one to where it points, and the fallback goes."""
        def redirect(handler: _Handler) -> None:
            if handler.path != "/engine":
                return answers_json(handler)
            handler.send_response(status)
            handler.send_header("Location", location)
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with serving(redirect) as server:
            answers = guarded(server.url(), LOOPBACK).answer(unlucky, inbound(unlucky))

        assert [Answer(FALLBACK)] == answers
        assert ["/engine"] == server.paths
        assert ["redirect"] == outcomes(logs)


def drip(where: str) -> Respond:
    """An engine that sends its answer a byte every 0.2 s: in the status line or in the body."""
    def respond(handler: _Handler) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ANSWER)
        slow, fast = (head, b"") if where == "headers" else (ANSWER, head)
        handler.wfile.write(fast)
        for byte in slow:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.2)
        if where == "headers":
            handler.wfile.write(ANSWER)
    return respond


def endless(handler: _Handler) -> None:
    """An 8 MB answer with no length: to a client that reads it all, a very long one."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(b'[{"text": "')
    chunk = b"a" * 65536
    for _ in range(128):
        handler.wfile.write(chunk)
    handler.wfile.write(b'"}]')


class TestLimits:
    """A call ends by its deadline whatever the engine's pace, and reads no more than 256 KiB."""

    @pytest.mark.parametrize("where", ["headers", "body"])
    def test_an_engine_dripping_bytes_is_cut_off_at_the_deadline(
            self, where: str, unlucky: Bot, redis: redis_lib.Redis, logs: list[dict[str, Any]]) -> None:
        """Each byte comes well within the read timeout, yet the call ends at the 1 s deadline."""
        with serving(drip(where)) as server:
            started = time.monotonic()
            answers = guarded(server.url(), LOOPBACK, deadline=1.0, read_timeout=5.0).answer(
                unlucky, inbound(unlucky))
            took = time.monotonic() - started

        assert [Answer(FALLBACK)] == answers
        assert took < 1.5
        assert "timeout" == outcomes(logs)[0]

    def test_an_answer_declared_over_the_cap_is_refused_unread(
            self, unlucky: Bot, redis: redis_lib.Redis, logs: list[dict[str, Any]]) -> None:
        """A 1 MB answer (by its Content-Length) is too large before a byte of it is read: refused
        at once, not retried, and the fallback goes."""
        def megabyte(handler: _Handler) -> None:
            handler.send_response(200)
            handler.send_header("Content-Length", str(1_000_000))
            handler.end_headers()
            handler.wfile.write(b'[{"text": "')
            time.sleep(3)  # the rest would come later: reading it would wait for it

        with serving(megabyte) as server:
            started = time.monotonic()
            answers = guarded(server.url(), LOOPBACK).answer(unlucky, inbound(unlucky))
            took = time.monotonic() - started

        assert [Answer(FALLBACK)] == answers
        assert ["too_large"] == outcomes(logs)
        assert took < 1.0
        assert 1 == len(server.requests)

    def test_an_endless_answer_is_cut_at_the_cap_and_its_connection_closed(
            self, unlucky: Bot, redis: redis_lib.Redis, logs: list[dict[str, Any]]) -> None:
        """An answer without a length stops being read at 256 KiB (well before the deadline), and
        its connection is closed rather than kept for the next call."""
        with serving(endless) as server:
            started = time.monotonic()
            answers = guarded(server.url(), LOOPBACK, deadline=5.0).answer(unlucky, inbound(unlucky))
            took = time.monotonic() - started

            assert server.hung_up.wait(2.0)
        assert [Answer(FALLBACK)] == answers
        assert ["too_large"] == outcomes(logs)
        assert took < 2.0

    def test_an_answer_under_the_cap_is_read_whole(self, bot: Bot, redis: redis_lib.Redis) -> None:
        """The cap leaves room for any real answer: about 170 KiB of replies are read and parsed."""
        texts = b", ".join(b'{"text": "%d"}' % n for n in range(10_000))
        with serving(lambda handler: answers_json(handler, b"[" + texts + b"]")) as server:
            answers = guarded(server.url(), LOOPBACK).answer(bot, inbound(bot))

        assert 10_000 == len(answers)


class TestMedia:
    """Only https images (http too in development) at a public host reach Twilio; the text still goes."""

    @pytest.mark.parametrize("image", ["javascript:alert(1)", "file:///etc/passwd", "data:image/png;base64,AAAA",
                                       "http://img.example/a.png", "https://127.0.0.1/a.png", "https://[::1]/a.png",
                                       "https://169.254.169.254/latest/meta-data/", "https://0x7f000001/a.png",
                                       "https://user:pw@img.example/a.png", "ftp://img.example/a.png", "https:///a"])
    def test_a_refused_image_is_dropped_and_the_text_kept(self, image: str, logs: list[dict[str, Any]]) -> None:
        """The reply goes without its image, and the refusal is logged."""
        answers = parse_answers([{"text": "mira", "image": image}, {"image": image}])

        assert [Answer("mira")] == answers
        assert 2 == sum(1 for entry in logs if entry["event"] == "engine.media_refused")

    @pytest.mark.parametrize("image, development", [("https://img.example/a.png", False),
                                                    ("https://93.184.216.34/a.png", False),
                                                    ("http://img.example/a.png", True)])
    def test_a_public_https_image_is_kept(self, image: str, development: bool) -> None:
        """https at a public host always, plain http only in development."""
        assert [Answer("mira", image)] == parse_answers([{"text": "mira", "image": image}], development=development)

    def test_an_engines_answer_over_http_drops_a_refused_image(self, bot: Bot, redis: redis_lib.Redis) -> None:
        """Through a real call: the engine's javascript: image is dropped, its text sent."""
        body = b'[{"text": "mira", "image": "javascript:alert(1)"}]'
        with serving(lambda handler: answers_json(handler, body)) as server:
            answers = guarded(server.url(), LOOPBACK).answer(bot, inbound(bot))

        assert [Answer("mira")] == answers

    def test_a_callback_reply_drops_a_refused_image(self, client: FlaskClient, admin_headers: dict[str, str],
                                                    bot: Bot, store: BotStore, redis: redis_lib.Redis,
                                                    logs: list[dict[str, Any]]) -> None:
        """An engine callback's file: image is dropped with a log event; its text is queued."""
        bot = store.update(bot.id, {"allow-cold-push": True})  # the recipient never wrote: not what this is about
        recipient = "+15551230001"
        response = client.post(f"/channels/sms/callback/{bot.id}", headers=admin_headers, json=[
            {"recipient_id": recipient, "text": "mira", "image": "file:///etc/passwd"},
            {"recipient_id": recipient, "image": "https://10.0.0.1/a.png"},
        ])

        assert 202 == response.status_code
        assert [("mira", None)] == [(reply["text"], reply.get("media_url")) for reply in queued(redis, bot, recipient)]
        assert 2 == sum(1 for entry in logs if entry["event"] == "engine.media_refused")


class TestRules:
    """The address and URL rules themselves, and where they are configured."""

    @pytest.mark.parametrize("address, reason", [
        ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
        ("169.254.169.254", "link_local"), ("100.64.0.1", "cgnat"), ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"), ("::1", "loopback"), ("::", "unspecified"),
        ("fe80::1", "link_local"), ("fd00:ec2::254", "private"), ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("2002:a00:1::", "private"),
        ("8.8.8.8", None), ("2606:4700:4700::1111", None),
    ])
    def test_internal_addresses_are_named(self, address: str, reason: str | None) -> None:
        """Each internal range is refused under its own name; public addresses pass."""
        assert reason == NOWHERE.refusal(ip_address(address))
        assert (reason is not None) == (internal_reason(ip_address(address)) is not None)

    def test_development_allows_loopback_only(self) -> None:
        """mammut-sms dev and the tests run engines on loopback; private networks stay refused."""
        development = AddressPolicy(allow_loopback=True)

        assert (None, "private") == (development.refusal(ip_address("127.0.0.1")),
                                     development.refusal(ip_address("10.0.0.1")))

    @pytest.mark.parametrize("host, address", [("0x7f000001", "127.0.0.1"), ("2130706433", "127.0.0.1"),
                                               ("127.1", "127.0.0.1"), ("[::1]", "::1"), ("LOCALHOST", "127.0.0.1"),
                                               ("engine.example", None)])
    def test_odd_spellings_are_read_as_the_c_library_reads_them(self, host: str, address: str | None) -> None:
        assert address == (str(spelled_address(host)) if spelled_address(host) else None)

    def test_media_rule_names_the_scheme(self) -> None:
        assert ("scheme_javascript", None) == (media_refusal("javascript:alert(1)", development=False),
                                               media_refusal("https://img.example/a.png", development=False))

    def test_engine_allowed_networks_is_read_and_checked_at_start(self) -> None:
        """Comma-separated CIDRs (a bare address is one host); anything else stops the process, named."""
        settings = Settings.from_env({"MAMMUT_SMS_ENV": "development",
                                      "ENGINE_ALLOWED_NETWORKS": "10.0.0.0/8, fd00::/8,192.168.1.5"})

        assert ("10.0.0.0/8", "fd00::/8", "192.168.1.5/32") == tuple(str(n) for n in settings.engine_allowed_networks)
        for bad in ("10.0.0.1/8", "intranet", "10.0.0.0/33"):
            with pytest.raises(SettingsError, match="ENGINE_ALLOWED_NETWORKS"):
                Settings.from_env({"MAMMUT_SMS_ENV": "development", "ENGINE_ALLOWED_NETWORKS": bad})

    def test_registration_refuses_credentials_in_the_engine_url(self, client: FlaskClient,
                                                                admin_headers: dict[str, str]) -> None:
        """user:password@ in engine-url is a 400 saying where an engine's credentials belong."""
        response = client.post(USERS, json=seed_body(**{"engine-url": "https://rasa:s3cret@rasa.example/hook"}),
                               headers=admin_headers)

        assert 400 == response.status_code
        assert "engine's own configuration" in response.json["errors"]["engine-url"][0]


class TestEngineUrlSecrets:
    """An engine URL may carry a key (`?token=...`): stored encrypted, shown and logged redacted, used whole."""

    def test_the_url_is_stored_encrypted_shown_redacted_and_called_whole(
            self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot, store: BotStore,
            settings: Any, engine: FakeEngine, logs: list[dict[str, Any]]) -> None:
        from sqlalchemy import select

        from shared.db import get_engine
        from shared.schema import bots

        url = engine.url + "?token=s3cr3t-value&lang=es"
        assert 200 == client.post(f"/app:mammut-1/graph/user:{bot.id}", json={"engine-url": url},
                                  headers=admin_headers).status_code
        with get_engine(settings).connect() as connection:
            stored = connection.execute(select(bots.c.engine_url).where(bots.c.id == bot.id)).scalar_one()
        shown = client.get(f"/app:mammut-1/graph/user:{bot.id}", headers=admin_headers).get_json()["data"]["user"][0]
        assert "s3cr3t" not in stored and "s3cr3t" not in json.dumps(shown)
        assert shown["engine-url"].endswith("?token=***&lang=***")
        bot = store.get(bot.id)
        assert bot is not None and url == bot.engine_url  # the worker reads it whole
        answers = engine_for(bot, Settings.from_env({"MAMMUT_SMS_ENV": "development"})).answer(bot, inbound(bot))
        assert [Answer("reply to hola")] == answers
        assert [] == [event for event in logs if "s3cr3t" in json.dumps(event)]


def test_a_bots_engine_at_the_services_own_public_url_is_refused(bot: Bot, store: BotStore,
                                                                 logs: list[dict[str, Any]]) -> None:
    """engine-url https://sms.example.com/channels/sms/callback/1 (the service itself): nothing is sent."""
    own = store.update(bot.id, {"engine-url": "https://SMS.example.com./channels/sms/callback/1",
                                "fallback-message": "sorry"})
    settings = Settings.from_env({"MAMMUT_SMS_ENV": "development", "PUBLIC_URL": "https://sms.example.com"})
    assert [Answer("sorry")] == engine_for(own, settings).answer(own, inbound(own))
    assert ["the service itself"] == [e["reason"] for e in logs if e["event"] == "engine.refused_address"]
    # Another port of that host is another server (in development, a local engine beside the service)
    local = Settings.from_env({"MAMMUT_SMS_ENV": "development", "PUBLIC_URL": "http://127.0.0.1:1"})
    with FakeEngine() as fake:
        beside = store.update(bot.id, {"engine-url": fake.url})
        assert [Answer("reply to hola")] == engine_for(beside, local).answer(beside, inbound(beside))
