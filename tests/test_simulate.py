"""`mammut-sms simulate` against a live web app and a Dramatiq worker, with the Twilio stand-in."""

from __future__ import annotations

import dramatiq
import pytest
import redis as redis_lib
from flask import Flask
from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from cli.bots import RegistryClient
from cli.main import main
from cli.simulate import SimulateError, replies_to, webhook_url
from cli.twilio_standin import TwilioStandin
from shared import keys
from shared.bots import Bot
from shared.settings import Settings
from tests.conftest import ADMIN_TOKEN, BOT_AUTH_TOKEN, BOT_NUMBER, CREDENTIALS_KEY
from tests.conftest import serving
from webhook import create_app

PERSON = "+15551230000"


@pytest.fixture
def outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator's laptop: none of the service's environment."""
    for name in ("REDIS_URL", "PUBLIC_URL", "CREDENTIALS_KEY", "ADMIN_API_TOKEN", "MAMMUT_SMS_ENV", "TWILIO_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def service_environment(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `heroku run` gives a one-off process: the service's own variables."""
    monkeypatch.delenv("PUBLIC_URL", raising=False)
    for name, value in {"REDIS_URL": redis_url, "CREDENTIALS_KEY": CREDENTIALS_KEY, "ADMIN_API_TOKEN": ADMIN_TOKEN,
                        "MAMMUT_SMS_ENV": "development"}.items():
        monkeypatch.setenv(name, value)


def _simulate(capsys: pytest.CaptureFixture[str], url: str, *options: str, text: str = "hola",
              path: str = "/channels/sms/", to: str = BOT_NUMBER) -> tuple[int, str, str]:
    code = main(["simulate", "--url", f"{url}{path}", "--to", to, "--from", PERSON, *options, text])
    out, err = capsys.readouterr()
    return code, out, err


class TestReplies:
    """simulate posts a signed webhook and prints what the bot answered, as it is sent."""

    def test_with_the_services_environment_the_token_comes_from_the_store(
        self, service_environment: None, live_server: str, bot: Bot, worker: dramatiq.Worker,
        twilio: TwilioStandin, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """No token on the command line: the store at REDIS_URL supplies it, and the echo reply is printed."""
        code, out, err = _simulate(capsys, live_server, "--wait", "20", text="¿Cómo estás?")
        assert 0 == code, err
        assert f"> {PERSON} -> {BOT_NUMBER}: ¿Cómo estás?" in out
        assert "echo: ¿Cómo estás?" in out.splitlines()[-1]
        assert ["echo: ¿Cómo estás?"] == [message.body for message in twilio.messages]

    def test_with_the_auth_token_given_the_bot_is_found_through_the_registry(
        self, outside: None, live_server: str, bot: Bot, worker: dramatiq.Worker, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """From a laptop: --auth-token signs, and the admin token finds the bot and reads its replies."""
        code, out, err = _simulate(capsys, live_server, "--auth-token", BOT_AUTH_TOKEN, "--admin-token", ADMIN_TOKEN)
        assert 0 == code, err
        assert out.splitlines()[-1].startswith("< ") and out.splitlines()[-1].endswith(": echo: hola")

    def test_the_auth_token_can_come_from_the_environment(
        self, outside: None, live_server: str, bot: Bot, worker: dramatiq.Worker, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """$TWILIO_AUTH_TOKEN signs as --auth-token would, without the token on the command line."""
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", BOT_AUTH_TOKEN)
        code, out, err = _simulate(capsys, live_server, "--admin-token", ADMIN_TOKEN)
        assert 0 == code, err
        assert out.splitlines()[-1].endswith(": echo: hola")

    def test_without_the_admin_token_it_sends_and_says_how_to_see_replies(
        self, outside: None, live_server: str, bot: Bot, redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The message is still delivered to the service; reading replies needs the registry's token."""
        code, out, _ = _simulate(capsys, live_server, "--auth-token", BOT_AUTH_TOKEN,
                                 "--account-sid", bot.account_sid, "--bot-id", str(bot.id))
        assert 0 == code
        assert "give --admin-token or set ADMIN_API_TOKEN" in out
        assert 1 == redis.llen(keys.inbox(keys.conversation_id(bot.id, PERSON)))


class TestRefusals:
    """What the operator must fix is said plainly, and nothing reaches the bot."""

    def test_a_wrong_auth_token_is_refused_with_an_explanation(
        self, outside: None, live_server: str, bot: Bot, redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The service's 403 comes back with the URL that was signed and what to check."""
        code, _, err = _simulate(capsys, live_server, "--auth-token", "not-the-token", "--admin-token", ADMIN_TOKEN)
        assert 1 == code
        assert "HTTP 403: bad_signature" in err and f"signed over {live_server}/channels/sms/" in err
        assert 0 == redis.llen(keys.inbox(keys.conversation_id(bot.id, PERSON)))

    def test_without_any_token_it_says_where_the_token_comes_from(
        self, outside: None, live_server: str, bot: Bot, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Neither the store nor --auth-token: a one-line error naming both."""
        code, _, err = _simulate(capsys, live_server, "--admin-token", ADMIN_TOKEN)
        assert 1 == code
        assert "set $TWILIO_AUTH_TOKEN or pass --auth-token" in err and "or run with the service's environment" in err

    def test_an_unknown_number_is_named(self, outside: None, live_server: str, bot: Bot,
                                        capsys: pytest.CaptureFixture[str]) -> None:
        """A --to no bot has is caught by the registry lookup before anything is sent."""
        code = main(["simulate", "--url", f"{live_server}/channels/sms/", "--to", "+15550009999", "--from", PERSON,
                     "--auth-token", BOT_AUTH_TOKEN, "--admin-token", ADMIN_TOKEN, "hola"])
        assert 1 == code
        assert "no bot has the number +15550009999" in capsys.readouterr().err


class TestUrl:
    """--url takes the service's base URL as well as its webhook URL, and a wrong one is named as wrong."""

    @pytest.mark.parametrize("path", ["", "/", "/channels/sms"])
    def test_the_base_url_or_the_webhook_without_its_slash_reaches_the_bot(
        self, outside: None, live_server: str, bot: Bot, worker: dramatiq.Worker, path: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The message is signed over the URL posted to, accepted, and answered."""
        code, out, err = _simulate(capsys, live_server, "--auth-token", BOT_AUTH_TOKEN, "--admin-token", ADMIN_TOKEN,
                                   path=path)
        assert 0 == code, err
        assert out.splitlines()[-1].endswith(": echo: hola")

    def test_a_base_url_behind_a_path_prefix_reaches_the_webhook(
        self, outside: None, app: Flask, bot: Bot, redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A proxy that serves the app under /prefix: the webhook is at the prefix + /channels/sms/, signed so."""
        app.wsgi_app = DispatcherMiddleware(NotFound(), {"/prefix": app.wsgi_app})  # type: ignore[method-assign]
        with serving(app) as url:
            code, out, err = _simulate(capsys, url, "--auth-token", BOT_AUTH_TOKEN, "--account-sid", bot.account_sid,
                                       "--bot-id", str(bot.id), path="/prefix")
        assert 0 == code, err
        assert "accepted" in out
        assert 1 == redis.llen(keys.inbox(keys.conversation_id(bot.id, PERSON)))

    @pytest.mark.parametrize("given", ["/prefix", "/prefix/", "/prefix/channels/sms/"])
    def test_the_registry_behind_a_path_prefix_is_reached_there(
        self, given: str, app: Flask, bot: Bot, redis: redis_lib.Redis,
    ) -> None:
        """The CLI's registry calls keep the base URL's path prefix (and take the webhook's URL too)."""
        app.wsgi_app = DispatcherMiddleware(NotFound(), {"/prefix": app.wsgi_app})  # type: ignore[method-assign]
        with serving(app) as url:
            bots = RegistryClient(url + given, ADMIN_TOKEN).list()
        assert [bot.id] == [int(entry["id"]) for entry in bots]

    def test_a_wrong_url_is_named_as_wrong(
        self, outside: None, live_server: str, bot: Bot, redis: redis_lib.Redis, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The service's generic 404 says the URL is wrong, names it and the right form, and blames no number."""
        code, _, err = _simulate(capsys, live_server, "--auth-token", BOT_AUTH_TOKEN,
                                 "--account-sid", bot.account_sid, "--wait", "0", path="/nope/")
        assert 1 == code
        assert f"nothing at {live_server}/nope/channels/sms/ takes the webhook (HTTP 404): the URL is wrong" in err
        assert f"such as {live_server}/channels/sms/" in err
        assert "no bot has" not in err
        assert 0 == redis.llen(keys.inbox(keys.conversation_id(bot.id, PERSON)))

    def test_an_unknown_number_at_the_right_url_is_the_numbers_fault(
        self, outside: None, live_server: str, bot: Bot, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Without the registry to look it up first, the webhook's own 404 names the number, not the URL."""
        code, _, err = _simulate(capsys, live_server, "--auth-token", BOT_AUTH_TOKEN,
                                 "--account-sid", bot.account_sid, "--wait", "0", to="+15550009999")
        assert 1 == code
        assert "no bot has the number +15550009999" in err
        assert "URL is wrong" not in err

    @pytest.mark.parametrize(("given", "expected"), [
        ("http://localhost:5000", "http://localhost:5000/channels/sms/"),
        ("http://localhost:5000/", "http://localhost:5000/channels/sms/"),
        ("https://host/prefix", "https://host/prefix/channels/sms/"),
        ("https://host/prefix/", "https://host/prefix/channels/sms/"),
        ("https://host/prefix/channels/sms", "https://host/prefix/channels/sms"),
        ("https://host/channels/sms/?rc=2#top", "https://host/channels/sms/?rc=2"),
    ])
    def test_a_base_url_gets_the_webhook_path_and_a_webhook_url_is_kept(self, given: str, expected: str) -> None:
        """Either spelling of the webhook is posted to as typed (the service serves both); the fragment is not sent."""
        assert expected == webhook_url(given)

    @pytest.mark.parametrize("given", ["localhost:5000", "ftp://host/", "/channels/sms/"])
    def test_what_is_not_an_http_url_is_refused(self, given: str) -> None:
        """Nothing is posted to a URL requests would refuse anyway; the error shows the form wanted."""
        with pytest.raises(SimulateError, match="http://localhost:5000"):
            webhook_url(given)


class TestSignedUrl:
    """simulate signs over the URL the service validates: PUBLIC_URL's when it is set."""

    @pytest.fixture
    def public_app(self, settings: Settings) -> Flask:
        return create_app(settings.with_overrides(public_url="https://sms.example.com"))

    @pytest.mark.parametrize("path", ["/channels/sms/", "/channels/sms", ""])
    def test_with_public_url_set_the_signature_is_over_it(
        self, outside: None, public_app: Flask, bot: Bot, redis: redis_lib.Redis, path: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Posting to the local address, by any form of --url, while signing over PUBLIC_URL is accepted."""
        monkeypatch.setenv("PUBLIC_URL", "https://sms.example.com")
        with serving(public_app) as url:
            code, out, err = _simulate(capsys, url, "--auth-token", BOT_AUTH_TOKEN,
                                       "--account-sid", bot.account_sid, "--wait", "0", path=path)
        assert 0 == code, err
        assert "accepted" in out

    def test_without_public_url_here_the_service_refuses_the_local_signature(
        self, outside: None, public_app: Flask, bot: Bot, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The same request signed over the local URL fails: the service validates PUBLIC_URL's."""
        with serving(public_app) as url:
            code, _, err = _simulate(capsys, url, "--auth-token", BOT_AUTH_TOKEN,
                                     "--account-sid", bot.account_sid, "--wait", "0")
        assert 1 == code
        assert "HTTP 403" in err


def test_replies_are_the_outbound_entries_after_the_message() -> None:
    """Earlier replies in the same conversation are not mistaken for answers to this message."""
    log = [
        {"id": "SM1", "direction": "in"}, {"id": "r1", "direction": "out"},
        {"id": "SM2", "direction": "in"}, {"id": "r2", "direction": "out"}, {"id": "r3", "direction": "out"},
    ]
    assert ["r2", "r3"] == [entry["id"] for entry in replies_to(log, "SM2")]
    assert [] == replies_to(log, "SM3")


def test_the_replies_of_a_long_conversation_are_found_on_its_newest_page(bot: Bot, settings: Settings,
                                                                          live_server: str) -> None:
    """The log pages (100 messages at a time): simulate reads the newest page, where its message's replies are."""
    import time

    from shared import db, messagelog

    # Given a conversation of 150 exchanges, the last of them just now
    sender = "+15551239999"
    with db.transaction(db.get_engine(settings)) as connection:
        for n in range(150):
            at = time.time() - 150 + n
            message = {"sid": f"SM{n:032d}", "bot_id": bot.id, "sender": sender, "to": bot.number,
                       "body": f"message {n}", "media": [], "received_at": at}
            reply = {"id": f"SM{n:032d}-0", "bot_id": bot.id, "to": sender, "text": f"reply {n}",
                     "media_url": None, "in_reply_to": message["sid"], "created_at": at + 0.5}
            messagelog.record_exchange(connection, message, [reply], bot.number)

    # When simulate reads the log, as it does after texting
    entries = RegistryClient(live_server, ADMIN_TOKEN).messages(bot.id, sender)

    # Then the latest message's reply is there, after it, oldest first
    assert ["reply 149"] == [entry["text"] for entry in replies_to(entries, f"SM{149:032d}")]
