"""The operator console over HTTP: sign-in, sessions and CSRF, scopes, and each page's actions taking
the REST API's own path."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import redis as redis_lib
from flask import Flask
from flask_babel import gettext as _
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from shared import deadletters, handoff, keys, messagelog, metrics, operators, optout
from shared.bots import Bot, BotStore, Limits, token_hash
from shared.conversations import new_reply
from shared.db import get_engine, transaction
from shared.segments import count_segments, split_message
from shared.settings import Settings
from shared.twilio_errors import HINTS, STATUS_HINTS
from tests.conftest import BOT_ACCOUNT_SID, BOT_AUTH_TOKEN
from tests.support.fake_engine import FakeEngine
from worker.engine import HttpEngine

PASSWORD = "a long enough password"
PERSON = "+15551230001"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
def other_bot(store: BotStore, bot: Bot) -> Bot:
    return store.create({"name": "other-bot", "twilio-account-sid": BOT_ACCOUNT_SID,
                         "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": "+15005550007"})


def add_operator(settings: Settings, email: str, role: str, bots: list[int]) -> operators.Operator:
    with transaction(get_engine(settings)) as connection:
        return operators.add(connection, email, role, bots, PASSWORD)


def csrf_of(page: TestResponse) -> str:
    found = _CSRF.search(page.get_data(as_text=True))
    assert found, page.get_data(as_text=True)[:500]
    return found.group(1)


def sign_in(client: FlaskClient, email: str, password: str = PASSWORD, **headers: str) -> TestResponse:
    form = client.get("/console/sign-in", headers=headers)
    return client.post("/console/sign-in", data={"email": email, "password": password, "csrf": csrf_of(form)},
                       headers=headers)


def log_exchange(settings: Settings, bot: Bot, person: str, text: str, reply: str | None = None) -> None:
    """An inbound message (and the bot's answer) in the log, as the worker's log drain writes them."""
    message = {"sid": f"SM{time.time_ns()}", "bot_id": bot.id, "sender": person, "to": bot.number, "body": text,
               "media": [], "received_at": time.time()}
    replies = [new_reply(keys.conversation_id(bot.id, person), person, reply)] if reply else []
    with transaction(get_engine(settings)) as connection:
        messagelog.record_exchanges(connection, [messagelog.Exchange(message, replies, bot.number)])


@pytest.fixture
def admin(client: FlaskClient, settings: Settings, bot: Bot) -> FlaskClient:
    """A client signed in as an admin of every bot."""
    add_operator(settings, "admin@example.com", "admin", [])
    assert 302 == sign_in(client, "admin@example.com").status_code
    return client


@pytest.fixture
def scoped(app: Flask, settings: Settings, bot: Bot, other_bot: Bot) -> FlaskClient:
    """A client signed in as an operator of bot 1 only."""
    client = app.test_client()
    add_operator(settings, "ana@example.com", "operator", [bot.id])
    assert 302 == sign_in(client, "ana@example.com").status_code
    return client


def page_csrf(client: FlaskClient, path: str = "/console/") -> str:
    return csrf_of(client.get(path))


def conversation_path(bot: Bot, person: str = PERSON) -> str:
    return f"/console/conversations/{bot.id}/{person}"


class TestSignIn:
    """Sessions: who may in, for how long, and how it ends."""

    def test_pages_need_a_session_and_the_sign_in_sets_a_locked_down_cookie(
            self, client: FlaskClient, settings: Settings, bot: Bot) -> None:
        """Without a session a page redirects to sign-in; the session cookie is HttpOnly, SameSite, and path /console."""
        add_operator(settings, "ana@example.com", "operator", [])
        before = client.get("/console/")
        signed = sign_in(client, "ana@example.com")
        cookie = signed.headers.getlist("Set-Cookie")[0]
        assert (302, "/console/sign-in") == (before.status_code, before.location.split("?")[0])
        assert 302 == signed.status_code and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert "Path=/console" in cookie and "Secure" not in cookie  # plain http here: Secure over https
        assert 200 == client.get("/console/").status_code

    def test_the_cookie_is_secure_behind_https(self, client: FlaskClient, settings: Settings, bot: Bot) -> None:
        """Behind Heroku's router (X-Forwarded-Proto: https) the session cookie is Secure."""
        add_operator(settings, "ana@example.com", "operator", [])
        signed = sign_in(client, "ana@example.com", **{"X-Forwarded-Proto": "https"})
        assert "Secure" in signed.headers.getlist("Set-Cookie")[0]

    def test_a_wrong_password_is_refused_and_repeated_failures_lock_the_account_for_a_while(
            self, client: FlaskClient, settings: Settings, bot: Bot) -> None:
        """Five failures for one account: the sixth try is refused (429) even with the right password."""
        add_operator(settings, "ana@example.com", "operator", [])
        failures = [sign_in(client, "ana@example.com", "wrong password!").status_code for _ in range(5)]
        locked = sign_in(client, "ana@example.com")
        assert [401] * 5 == failures
        assert 429 == locked.status_code

    def test_a_session_ends_after_12_hours_and_a_lock_after_15_minutes(
            self, client: FlaskClient, settings: Settings, bot: Bot, redis: redis_lib.Redis) -> None:
        """The session lives 12 hours (the cookie's Max-Age and Redis's record alike), and an account
        locked by failed sign-ins stays locked about 15 minutes, not less."""
        # Given one operator signed in, and another locked out by five failures
        add_operator(settings, "ana@example.com", "operator", [])
        add_operator(settings, "eva@example.com", "operator", [])
        signed = sign_in(client, "ana@example.com")
        for _ in range(5):
            sign_in(client, "eva@example.com", "wrong password!")

        # Then the session's cookie and record last 12 hours
        cookie = signed.headers.getlist("Set-Cookie")[0]
        token = cookie.split(";")[0].split("=", 1)[1]
        assert "Max-Age=43200" in cookie
        assert 11 * 3600 < redis.ttl(keys.console_session(token_hash(token))) <= 12 * 3600
        # and the lock about 15 minutes
        assert 14 * 60 < redis.ttl(keys.console_sign_in_failures("account", "eva@example.com")) <= 15 * 60
        assert 429 == sign_in(client, "eva@example.com").status_code

    def test_failures_from_one_address_across_accounts_are_limited(
            self, client: FlaskClient, settings: Settings, bot: Bot) -> None:
        """Twenty failures from one address (as Heroku's router forwards it), over many accounts: that
        address is refused next, and another address is not."""
        add_operator(settings, "ana@example.com", "operator", [])
        for n in range(20):
            sign_in(client, f"guess{n}@example.com", "wrong password!", **{"X-Forwarded-For": "203.0.113.7"})
        blocked = sign_in(client, "ana@example.com", **{"X-Forwarded-For": "203.0.113.7"})
        elsewhere = sign_in(client, "ana@example.com", **{"X-Forwarded-For": "198.51.100.2"})
        assert (429, 302) == (blocked.status_code, elsewhere.status_code)

    def test_signing_out_ends_the_session_on_every_device(
            self, app: Flask, settings: Settings, bot: Bot) -> None:
        """Two browsers signed in as one operator; signing out in one signs out the other too."""
        add_operator(settings, "ana@example.com", "operator", [])
        phone, laptop = app.test_client(), app.test_client()
        sign_in(phone, "ana@example.com")
        sign_in(laptop, "ana@example.com")
        out = phone.post("/console/sign-out", data={"csrf": page_csrf(phone)})
        assert 302 == out.status_code
        assert 302 == laptop.get("/console/").status_code

    def test_a_removed_account_is_signed_out_at_once(
            self, client: FlaskClient, settings: Settings, bot: Bot) -> None:
        """The session is checked against the account on every request."""
        add_operator(settings, "ana@example.com", "operator", [])
        sign_in(client, "ana@example.com")
        with transaction(get_engine(settings)) as connection:
            operators.remove(connection, "ana@example.com")
        assert 302 == client.get("/console/").status_code


class TestCsrf:
    """A change needs the session's CSRF token, and a browser's Origin must be this site."""

    def test_a_post_without_the_token_or_from_another_origin_is_refused(
            self, admin: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        path = conversation_path(bot) + "/take-over"
        token = page_csrf(admin)
        missing = admin.post(path, data={})
        wrong = admin.post(path, data={"csrf": "x" + token})
        foreign = admin.post(path, data={"csrf": token}, headers={"Origin": "https://evil.example"})
        good = admin.post(path, data={"csrf": token}, headers={"Origin": "http://localhost"})
        assert (403, 403, 403, 302) == tuple(r.status_code for r in (missing, wrong, foreign, good))
        assert redis.hexists(keys.handoffs(bot.id), PERSON)

    def test_the_sign_in_form_needs_its_own_token(self, client: FlaskClient, settings: Settings, bot: Bot) -> None:
        """A sign-in posted from elsewhere (no token cookie) is refused before the password is checked."""
        add_operator(settings, "ana@example.com", "operator", [])
        forged = client.post("/console/sign-in", data={"email": "ana@example.com", "password": PASSWORD,
                                                       "csrf": "made-up"})
        assert 403 == forged.status_code


class TestScope:
    """An operator of bot 1 sees and reaches bot 1 only."""

    def test_the_inbox_lists_only_its_bots_conversations(
            self, scoped: FlaskClient, settings: Settings, bot: Bot, other_bot: Bot) -> None:
        log_exchange(settings, bot, "+15551230001", "mine")
        log_exchange(settings, other_bot, "+15551230002", "theirs")
        page = scoped.get("/console/").get_data(as_text=True)
        assert "+15551230001" in page and "+15551230002" not in page

    @pytest.mark.parametrize("method, suffix", [("GET", ""), ("POST", "/send"), ("POST", "/take-over"),
                                                ("POST", "/hand-back"), ("POST", "/erase")])
    def test_another_bots_conversation_cannot_be_reached_by_url(
            self, method: str, suffix: str, scoped: FlaskClient, settings: Settings, other_bot: Bot,
            redis: redis_lib.Redis) -> None:
        """404, as if it did not exist, and nothing changes."""
        log_exchange(settings, other_bot, PERSON, "theirs")
        response = scoped.open(conversation_path(other_bot) + suffix, method=method,
                               data={"csrf": page_csrf(scoped), "text": "hola", "confirm": PERSON})
        assert 404 == response.status_code
        assert 0 == redis.llen(keys.outbox(keys.conversation_id(other_bot.id, PERSON)))
        assert not redis.hexists(keys.handoffs(other_bot.id), PERSON)

    def test_bots_settings_and_erasure_are_for_admins(self, scoped: FlaskClient, bot: Bot) -> None:
        token = page_csrf(scoped)
        answers = {"bots": scoped.get("/console/bots").status_code,
                   "settings": scoped.post(f"/console/bots/{bot.id}/settings", data={"csrf": token, "name": "x"}).status_code,
                   "rotate": scoped.post(f"/console/bots/{bot.id}/engine-token", data={"csrf": token}).status_code,
                   "erase": scoped.post(conversation_path(bot) + "/erase",
                                        data={"csrf": token, "confirm": PERSON}).status_code}
        assert {"bots": 403, "settings": 403, "rotate": 403, "erase": 403} == answers


class TestConversation:
    """The conversation page's actions go through the REST API's functions."""

    def test_a_reply_sent_from_the_console_is_queued_once_and_logged_as_the_operators(
            self, admin: FlaskClient, settings: Settings, bot: Bot, redis: redis_lib.Redis) -> None:
        """Two posts with the page's idempotency key (a double click) queue one reply."""
        log_exchange(settings, bot, PERSON, "hola")
        page = admin.get(conversation_path(bot)).get_data(as_text=True)
        key = re.search(r'name="idempotency" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        form = {"csrf": csrf_of_text(page), "idempotency": key, "text": "soy Ana"}
        first, second = admin.post(conversation_path(bot) + "/send", data=form), admin.post(conversation_path(bot) + "/send", data=form)
        assert (302, 302) == (first.status_code, second.status_code)
        assert "done=sent" in first.location
        assert 1 == redis.llen(keys.outbox(keys.conversation_id(bot.id, PERSON)))
        from worker.logdrain import drain

        drain(redis, get_engine(settings))  # the operator send's log record goes through Redis, as the worker writes it
        with get_engine(settings).connect() as connection:
            log = messagelog.read(connection, bot.id, PERSON).items
        assert [("out", "operator", "soy Ana")] == [(e["direction"], e["origin"], e["text"]) for e in log
                                                     if e["direction"] == "out"]

    def test_take_over_pauses_the_bot_and_hand_back_resumes_it(
            self, admin: FlaskClient, settings: Settings, bot: Bot, redis: redis_lib.Redis) -> None:
        token = page_csrf(admin)
        admin.post(conversation_path(bot) + "/take-over", data={"csrf": token})
        with get_engine(settings).connect() as connection:
            taken = handoff.active_of(connection, bot.id, [PERSON])
        held_page = admin.get(conversation_path(bot)).get_data(as_text=True)
        admin.post(conversation_path(bot) + "/hand-back", data={"csrf": token})
        with get_engine(settings).connect() as connection:
            back = handoff.active_of(connection, bot.id, [PERSON])
        assert "taken over by admin@example.com" == taken[PERSON].note
        assert 'id="hand-back"' in held_page and "A human has this conversation" in held_page
        assert {} == back

    def test_an_opted_out_persons_composer_is_disabled_with_a_banner(
            self, admin: FlaskClient, settings: Settings, bot: Bot, redis: redis_lib.Redis) -> None:
        optout.opt_out(get_engine(settings), redis, bot.number, PERSON, how="keyword STOP")
        page = admin.get(conversation_path(bot)).get_data(as_text=True)
        assert 'id="opted-out"' in page
        assert re.search(r'<textarea[^>]*disabled', page) and re.search(r'<button type="submit" id="send" disabled', page)

    def test_the_segment_count_is_the_senders(self, admin: FlaskClient, bot: Bot) -> None:
        """The composer's counts come from shared.segments: GSM-7, a UCS-2 switch, and a text split in two."""
        token = page_csrf(admin)
        for text in ["hola", "a" * 161, "¿Qué tal? 😀", "ñ" * 1700]:
            counts = admin.post("/console/segments", json={"text": text}, headers={"X-CSRF-Token": token}).get_json()
            parts = split_message(text)
            assert (len(text), sum(count_segments(p) for p in parts), len(parts)) == (
                counts["characters"], counts["segments"], counts["messages"])
        assert "UCS-2" == admin.post("/console/segments", json={"text": "😀"},
                                     headers={"X-CSRF-Token": token}).get_json()["encoding"]

    @pytest.mark.parametrize(("language", "text", "label"), [
        ("en", "a", "1 character · 1 segment · GSM-7"),
        ("en", "a" * 161, "161 characters · 2 segments · GSM-7"),
        ("es-CO,es;q=0.9", "😀", "1 carácter · 1 segmento · UCS-2"),
        ("es-CO,es;q=0.9", "hola", "4 caracteres · 1 segmento · GSM-7"),
    ])
    def test_the_counter_reads_in_the_operators_language_singular_and_plural(
            self, admin: FlaskClient, bot: Bot, language: str, text: str, label: str) -> None:
        """"1 segment", not "1 segments"; "1 carácter" for a Spanish browser."""
        token = page_csrf(admin)
        assert label == admin.post("/console/segments", json={"text": text},
                                   headers={"X-CSRF-Token": token, "Accept-Language": language}).get_json()["label"]

    def test_older_messages_are_paged_with_the_logs_cursor(
            self, admin: FlaskClient, settings: Settings, bot: Bot, monkeypatch: pytest.MonkeyPatch) -> None:
        """With 3 messages a page, 7 messages read as three pages, newest first, each in order, through
        "Older messages" links; the last page has none, and a forged cursor is not a page."""
        monkeypatch.setattr("webhook.console.pages.MESSAGES_SHOWN", 3)
        for n in range(1, 8):
            log_exchange(settings, bot, PERSON, f"mensaje {n}")
        pages, path = [], conversation_path(bot)
        while path:
            html = admin.get(path).get_data(as_text=True)
            pages.append(re.findall(r'<p class="text">mensaje (\d)</p>', html))
            older = re.search(r'<a id="older" href="([^"]+)"', html)
            path = older.group(1).replace("&amp;", "&") if older else ""
        assert [["5", "6", "7"], ["2", "3", "4"], ["1"]] == pages
        assert 'id="newest"' in html and "data-refresh" not in html  # an older page stays put
        assert 404 == admin.get(conversation_path(bot) + "?before=not-a-cursor").status_code

    def test_an_admin_erases_a_conversation_only_after_typing_the_number(
            self, admin: FlaskClient, settings: Settings, bot: Bot) -> None:
        log_exchange(settings, bot, PERSON, "hola")
        token = page_csrf(admin)
        unconfirmed = admin.post(conversation_path(bot) + "/erase", data={"csrf": token, "confirm": "yes"})
        with get_engine(settings).connect() as connection:
            kept = messagelog.read(connection, bot.id, PERSON).items
        admin.post(conversation_path(bot) + "/erase", data={"csrf": token, "confirm": PERSON})
        with get_engine(settings).connect() as connection:
            gone = messagelog.read(connection, bot.id, PERSON).items
        assert "problem=" in unconfirmed.location and 1 == len(kept)
        assert [] == gone


def csrf_of_text(page: str) -> str:
    found = _CSRF.search(page)
    assert found
    return found.group(1)


class TestInbox:
    """Filters, search, and what changed since it was last opened."""

    def test_filters_and_search_pick_the_conversations_meant(
            self, admin: FlaskClient, settings: Settings, bot: Bot, redis: redis_lib.Redis) -> None:
        log_exchange(settings, bot, "+15551230001", "quiero una cita")
        log_exchange(settings, bot, "+15551230002", "hola")
        log_exchange(settings, bot, "+15551230003", "STOP")
        handoff.pause(get_engine(settings), redis, bot.id, "+15551230002", by=handoff.BY_OPERATOR, timeout=3600)
        optout.opt_out(get_engine(settings), redis, bot.number, "+15551230003", how="keyword STOP")

        def people(query: str) -> list[str]:
            return re.findall(r'data-person="([^"]+)"', admin.get("/console/?" + query).get_data(as_text=True))

        assert ["+15551230003", "+15551230002", "+15551230001"] == people("")
        assert ["+15551230002"] == people("only=paused")
        assert ["+15551230003"] == people("only=opted-out")
        assert ["+15551230001"] == people("q=CITA")
        assert ["+15551230002"] == people("q=230002")

    def test_a_conversation_with_a_failed_delivery_is_found_by_its_filter(
            self, admin: FlaskClient, settings: Settings, bot: Bot) -> None:
        log_exchange(settings, bot, "+15551230001", "hola", reply="respuesta")
        log_exchange(settings, bot, "+15551230002", "hola", reply="respuesta")
        with get_engine(settings).connect() as connection:
            [reply] = [e for e in messagelog.read(connection, bot.id, "+15551230001").items if e["direction"] == "out"]
        with transaction(get_engine(settings)) as connection:
            messagelog.record_outcome(connection, reply["id"], messagelog.FAILED, error_code=21211)
        page = admin.get("/console/?only=failed").get_data(as_text=True)
        assert ["+15551230001"] == re.findall(r'data-person="([^"]+)"', page)
        detail = admin.get(conversation_path(bot, "+15551230001")).get_data(as_text=True)
        assert "not a valid phone number" in detail  # the Twilio error in words

    def test_a_conversation_that_changed_since_it_was_opened_stands_out(
            self, admin: FlaskClient, settings: Settings, bot: Bot) -> None:
        log_exchange(settings, bot, PERSON, "hola")
        before = admin.get("/console/").get_data(as_text=True)
        admin.get(conversation_path(bot))
        opened = admin.get("/console/").get_data(as_text=True)
        log_exchange(settings, bot, PERSON, "¿sigues ahí?")
        changed = admin.get("/console/").get_data(as_text=True)
        assert ('class="unseen"' in before, 'class="unseen"' in opened, 'class="unseen"' in changed) == (True, False, True)


class TestDeadLetters:
    def test_a_dead_letter_is_shown_with_why_and_replayed_from_the_page(
            self, admin: FlaskClient, settings: Settings, bot: Bot, redis: redis_lib.Redis) -> None:
        with transaction(get_engine(settings)) as connection:
            deadletters.record(connection, {
                "id": "r-1", "bot_id": bot.id, "person": PERSON, "text": "tu cita", "media_url": None,
                "error_code": 21211, "http_status": 400, "error": "invalid To", "reason": "permanent",
                "attempts": 1, "failed_at": time.time()})
        page = admin.get("/console/dead-letters").get_data(as_text=True)
        replayed = admin.post("/console/dead-letters/replay", data={"csrf": csrf_of_text(page), "bot": bot.id,
                                                                    "id": "r-1"})
        assert "not a valid phone number" in page and "tu cita" in page
        assert "replayed=1" in replayed.location
        assert 1 == redis.llen(keys.outbox(keys.conversation_id(bot.id, PERSON)))


class TestTwilioErrorsInSpanish:
    """What a Twilio error means is read in the browser's language."""

    def test_a_failed_replys_error_reads_in_spanish_on_the_conversation_and_dead_letter_pages(
            self, admin: FlaskClient, settings: Settings, bot: Bot) -> None:
        """A Spanish browser reads error 21211 in Spanish on both pages; an English one in English."""
        log_exchange(settings, bot, PERSON, "hola", reply="respuesta")
        with get_engine(settings).connect() as connection:
            [reply] = [e for e in messagelog.read(connection, bot.id, PERSON).items if e["direction"] == "out"]
        with transaction(get_engine(settings)) as connection:
            messagelog.record_outcome(connection, reply["id"], messagelog.FAILED, error_code=21211)
            deadletters.record(connection, {
                "id": reply["id"], "bot_id": bot.id, "person": PERSON, "text": "respuesta", "media_url": None,
                "error_code": 21211, "http_status": 400, "error": "invalid To", "reason": "permanent",
                "attempts": 1, "failed_at": time.time()})
        spanish = {"Accept-Language": "es-CO,es;q=0.9"}
        pages = [admin.get(path, headers=spanish).get_data(as_text=True)
                 for path in (conversation_path(bot), "/console/dead-letters")]
        english = admin.get(conversation_path(bot), headers={"Accept-Language": "en"}).get_data(as_text=True)
        assert all("no es un número de teléfono válido" in page for page in pages)
        assert not any("not a valid phone number" in page for page in pages)
        assert "not a valid phone number" in english

    def test_every_explained_code_and_status_has_a_spanish_translation(self, app: Flask) -> None:
        """The catalog translates every explanation of the error table, so none falls back to English."""
        untranslated = []
        with app.test_request_context("/console/", headers={"Accept-Language": "es"}):
            for text in [*HINTS.values(), *STATUS_HINTS.values()]:
                if _(text) == text:
                    untranslated.append(text)
        assert [] == untranslated


class TestPages:
    """Language, security headers, the admin's bot page and the overview."""

    def test_spanish_is_chosen_by_the_browsers_language(self, admin: FlaskClient, bot: Bot) -> None:
        spanish = admin.get("/console/", headers={"Accept-Language": "es-CO,es;q=0.9,en;q=0.5"}).get_data(as_text=True)
        english = admin.get("/console/", headers={"Accept-Language": "en-US"}).get_data(as_text=True)
        assert "Bandeja de entrada" in spanish and 'lang="es"' in spanish
        assert "Inbox" in english and "Bandeja de entrada" not in english

    def test_pages_carry_a_strict_content_security_policy(self, admin: FlaskClient, bot: Bot) -> None:
        response = admin.get("/console/")
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "<script>" not in response.get_data(as_text=True)  # no inline script to allow

    def test_the_bots_page_shows_twilios_urls_and_saves_through_the_registrys_validation(
            self, admin: FlaskClient, bot: Bot, store: BotStore) -> None:
        page = admin.get("/console/bots").get_data(as_text=True)
        token = csrf_of_text(page)
        refused = admin.post(f"/console/bots/{bot.id}/settings", data={"csrf": token, "messages-per-second": "-3"})
        saved = admin.post(f"/console/bots/{bot.id}/settings", data={"csrf": token, "fallback-message": "un momento"})
        rotated = admin.post(f"/console/bots/{bot.id}/engine-token", data={"csrf": token}).get_data(as_text=True)
        token_shown = re.search(r'<code class="secret">([^<]+)</code>', rotated)
        assert "/channels/sms/status" in page and "/channels/sms/" in page
        assert "problem=" in refused.location and "messages-per-second" in refused.location
        assert "done=" in saved.location and "un momento" == store.get(bot.id).fallback_message  # type: ignore[union-attr]
        assert token_shown and store.get(bot.id).accepts_engine_token(token_shown.group(1))  # type: ignore[union-attr]

    def test_saving_settings_leaves_a_masked_engine_url_as_stored(
            self, admin: FlaskClient, bot: Bot, store: BotStore) -> None:
        """The page shows an engine URL's key as ***; sending the form back unchanged keeps the real key."""
        store.update(bot.id, {"engine-url": "https://engine.example.com/webhook?token=s3cret"})
        page = admin.get("/console/bots").get_data(as_text=True)
        shown = dict(re.findall(r'<input name="([a-z-]+)" value="([^"]*)"', page))
        admin.post(f"/console/bots/{bot.id}/settings", data={**shown, "csrf": csrf_of_text(page), "name": "renamed"})
        saved = store.get(bot.id)
        assert "token=***" in shown["engine-url"]
        assert saved is not None and ("renamed", "https://engine.example.com/webhook?token=s3cret") == (
            saved.name, saved.engine_url)

    def test_an_emptied_setting_is_unset_as_the_apis_null(self, admin: FlaskClient, bot: Bot, store: BotStore) -> None:
        """Clearing the fallback message, the handoff URL and a limit on the Bots page unsets them (the
        limit back to its default) as the API's null does; an emptied name is refused as the API refuses it."""
        store.update(bot.id, {"fallback-message": "un momento", "handoff-url": "https://help.example.com/in",
                              "max-segments": 5})
        page = admin.get("/console/bots").get_data(as_text=True)
        shown = dict(re.findall(r'<input name="([a-z-]+)" value="([^"]*)"', page))
        emptied = {**shown, "csrf": csrf_of_text(page), "fallback-message": "", "handoff-url": "", "max-segments": " "}
        saved = admin.post(f"/console/bots/{bot.id}/settings", data=emptied)
        nameless = admin.post(f"/console/bots/{bot.id}/settings", data={**emptied, "name": ""})
        after = store.get(bot.id)
        assert "done=" in saved.location and "problem=" in nameless.location and "name" in nameless.location
        assert after is not None and (None, None, Limits().max_segments, bot.name) == (
            after.fallback_message, after.handoff_url, after.limits.max_segments, after.name)

    def test_the_overview_shows_each_bots_engine_latency_over_the_last_day(
            self, admin: FlaskClient, redis: redis_lib.Redis, bot: Bot, other_bot: Bot) -> None:
        """A bot whose engine takes 0.6 s to answer shows a median and p95 of at least that; a bot whose
        engine was not asked shows none, and an answer older than 24 hours no longer counts."""
        metrics.TALLY.forget()
        metrics.TALLY.engine_answered(other_bot.id, 99.0, at=time.time() - metrics.DAY - 60)
        with FakeEngine(delay=0.6) as slow:
            for text in ("hola", "¿hay citas?", "gracias"):
                HttpEngine(slow.url).answer(bot, {"sid": f"SM{time.time_ns()}", "bot_id": bot.id, "sender": PERSON,
                                                  "to": bot.number, "body": text, "media": [],
                                                  "received_at": time.time()})
        metrics.TALLY.flush(redis)  # what the worker's flusher writes every second
        page = admin.get("/console/overview").get_data(as_text=True)
        shown = re.findall(r'<dd class="latency">([^<]*)', page)
        [median, p95] = [float(n) for n in re.findall(r"([\d.]+) s", shown[0])]
        assert 2 == len(shown) and median >= 0.6 and p95 >= median
        spanish = admin.get("/console/overview", headers={"Accept-Language": "es"}).get_data(as_text=True)
        assert "3 answers" in page and "—" == shown[1]
        assert "3 respuestas" in spanish and "mediana" in spanish

    def test_the_overview_counts_the_last_day(self, admin: FlaskClient, settings: Settings, bot: Bot) -> None:
        log_exchange(settings, bot, PERSON, "hola", reply="respuesta")
        log_exchange(settings, bot, "+15551230002", "hola")
        page = admin.get("/console/overview").get_data(as_text=True)
        assert "2 in, 1 out" in page


