"""The console in a real browser (Debian's Chromium, driven by Playwright) against the Procfile's
processes: a text arrives and shows up live, a human takes over, answers and sees it delivered,
hands back; opt-outs, dead letters, scopes, CSRF and sessions; the same in Spanish.

The screenshots in docs/ (shown in the README) are taken here: into pytest's tmp_path, so a run
leaves the tree clean, and into docs/ when UPDATE_SCREENSHOTS=1 asks for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import redis as redis_lib
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright

from shared.segments import count_segments
from tests.conftest import BOT_NUMBER
from tests.support.console import PASSWORD, Service, running_service, wait_until

CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it); never `playwright install`
DOCS = Path(__file__).resolve().parents[1] / "docs"
PERSON = "+15551230001"
OTHER_NUMBER = "+15005550007"
WAIT_MS = 60_000
PHONE = {"width": 390, "height": 844}  # the pages work at phone width: the screenshots are taken there
expect.set_options(timeout=WAIT_MS)  # processes on a loaded machine: wait generously, never time them


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture
def service(worker_env: dict[str, str], redis: redis_lib.Redis, database: str) -> Iterator[Service]:
    with running_service(worker_env, database, WEB_THREADS="8", CONSOLE_STREAMS="3") as running:
        yield running


def screenshot_dir(tmp_path: Path, env: Mapping[str, str] = os.environ) -> Path:
    """Where a run writes its screenshots: docs/ only when UPDATE_SCREENSHOTS=1, else the test's own tmp_path."""
    return DOCS if env.get("UPDATE_SCREENSHOTS") == "1" else tmp_path


def test_screenshots_go_to_docs_only_when_asked(tmp_path: Path) -> None:
    """A plain run writes its screenshots to tmp_path; UPDATE_SCREENSHOTS=1 writes the tracked ones in docs/."""
    chosen = [screenshot_dir(tmp_path, env) for env in ({}, {"UPDATE_SCREENSHOTS": "1"}, {"UPDATE_SCREENSHOTS": "0"})]
    assert [tmp_path, DOCS, tmp_path] == chosen


def context(browser: Browser, locale: str = "en-US") -> BrowserContext:
    made = browser.new_context(locale=locale, viewport=PHONE, extra_http_headers={"Accept-Language": locale})
    made.set_default_timeout(WAIT_MS)
    return made


def sign_in(page: Page, service: Service, email: str) -> None:
    page.goto(service.base + "/console/")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(service.base + "/console/")


def conversation_url(service: Service, bot_id: int, person: str = PERSON) -> str:
    return f"{service.base}/console/conversations/{bot_id}/{person}"


def test_a_text_shows_up_live_is_taken_over_answered_delivered_and_handed_back(
        browser: Browser, service: Service, tmp_path: Path) -> None:
    """The whole flow of a human answering one person, with the engine silent while they hold it."""
    shots = screenshot_dir(tmp_path)
    bot_id = service.register(BOT_NUMBER, "Citas")
    service.add_operator("ana@example.com", "admin", [])
    page = context(browser).new_page()
    sign_in(page, service, "ana@example.com")
    page.evaluate("window.notReloaded = true")

    # A signed webhook arrives; its conversation appears in the open inbox without a reload
    assert 200 == service.text(BOT_NUMBER, PERSON, "hola, quiero una cita").status_code
    expect(page.locator(f'[data-person="{PERSON}"]')).to_be_visible()
    assert page.evaluate("window.notReloaded === true")
    service.twilio.wait_for(1, timeout=60)  # the bot's own answer
    page.screenshot(path=str(shots / "console-inbox.png"), full_page=True)

    # Take over: the engine is not asked about what the person says next
    page.click(f'[data-person="{PERSON}"]')
    page.click("#take-over")
    expect(page.locator("#hand-back")).to_be_visible()
    service.text(BOT_NUMBER, PERSON, "¿hay alguien?")
    expect(page.locator("#messages .message.in").last).to_contain_text("¿hay alguien?")
    # The log writes a text with its answers, so an engine's answer would show with it
    assert (1, 1) == (page.locator("#messages .message.out").count(), len(service.twilio.messages))

    # Type a reply: the page counts its segments as the sender will (UCS-2 for the emoji)
    reply = "Hola, soy Ana del equipo de citas. ¿Qué día te queda mejor? 😀 " * 2
    page.fill("#text", reply)
    expect(page.locator("#counter")).to_have_attribute("data-segments", str(count_segments(reply)))
    expect(page.locator("#counter")).to_contain_text(f"{len(reply)} characters · {count_segments(reply)} segments · UCS-2")

    # Send it, and watch it reach "delivered" from Twilio's status callback
    page.click("#send")
    expect(page.locator(".banner.good")).to_be_visible()
    sent = page.locator("#messages .message.out").last
    expect(sent).to_contain_text("soy Ana")
    expect(sent).to_have_attribute("data-status", "delivered")
    assert [reply.strip()] == [m.body.strip() for m in service.twilio.messages[1:]]
    page.screenshot(path=str(shots / "console-conversation.png"), full_page=True)

    # Hand back: the bot answers the next text again
    page.click("#hand-back")
    expect(page.locator("#take-over")).to_be_visible()
    service.text(BOT_NUMBER, PERSON, "gracias")
    service.twilio.wait_for(3, timeout=60)

    page.goto(service.base + "/console/overview")
    expect(page.locator("svg.bars").first).to_be_visible()
    page.screenshot(path=str(shots / "console-overview.png"), full_page=True)
    assert all((shots / f"console-{name}.png").stat().st_size for name in ("inbox", "conversation", "overview"))
    assert bot_id == 1


# Counts, in the page, the live stream's change events and the refreshes they start and finish.
COUNTING = """
(function () {
  window.changes = 0; window.refreshed = 0;
  var Source = window.EventSource;
  window.EventSource = function (url) {
    var stream = new Source(url);
    stream.addEventListener("change", function () { window.changes += 1; });
    return stream;
  };
  window.EventSource.CLOSED = Source.CLOSED;
  var fetching = window.fetch;
  window.fetch = function (url, options) {
    return fetching(url, options).then(function (answer) {
      if (String(url).indexOf("partial=1") >= 0) { answer.clone().text().then(function () { window.refreshed += 1; }); }
      return answer;
    });
  };
}());
"""


def test_a_change_while_the_page_is_refreshing_is_not_lost(browser: Browser, service: Service) -> None:
    """A change announced while a refresh is under way (its answer read before the change) is shown by
    one more refresh: never a page that shows "queued" for a message delivered long ago."""
    bot_id = service.register(BOT_NUMBER, "Citas")
    service.add_operator("ana@example.com", "admin", [])
    service.text(BOT_NUMBER, PERSON, "uno")
    service.twilio.wait_for(1, timeout=60)
    page = context(browser).new_page()
    page.add_init_script(COUNTING)
    sign_in(page, service, "ana@example.com")
    page.goto(conversation_url(service, bot_id))
    page.click("#take-over")  # from here each text is one change: logged, not answered
    expect(page.locator("#hand-back")).to_be_visible()
    expect(page.locator("#messages .message.out").last).to_have_attribute("data-status", "delivered")
    wait_until(lambda: page.evaluate("window.refreshed") >= 1, what="the stream open, and its refresh done")

    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)

    def refreshing(url: str) -> bool:
        return "partial=1" in url

    page.route(refreshing, hold)
    service.text(BOT_NUMBER, PERSON, "dos")
    wait_until(lambda: held or page.wait_for_timeout(100), what="the refresh the change to 'dos' starts")
    stale = held[0].fetch()  # the refresh reads the page now, with "dos" and without "tres"
    seen = page.evaluate("window.changes")
    service.text(BOT_NUMBER, PERSON, "tres")
    wait_until(lambda: page.evaluate("window.changes") > seen, what="'tres' announced while 'dos' is refreshing")
    held[0].fulfill(response=stale)
    page.unroute(refreshing)
    expect(page.locator("#messages .message.in").last).to_contain_text("tres")


def test_an_opted_out_persons_composer_is_disabled(browser: Browser, service: Service) -> None:
    """After the person texts STOP, the page says so and nothing can be typed or sent."""
    bot_id = service.register(BOT_NUMBER, "Citas")
    service.add_operator("ana@example.com", "operator", [])
    service.text(BOT_NUMBER, PERSON, "STOP")
    page = context(browser).new_page()
    sign_in(page, service, "ana@example.com")
    expect(page.locator(f'[data-person="{PERSON}"] .badge.muted')).to_be_visible()  # "opted out", live
    page.goto(conversation_url(service, bot_id))
    expect(page.locator("#opted-out")).to_be_visible()
    expect(page.locator("#text")).to_be_disabled()
    expect(page.locator("#send")).to_be_disabled()


def test_a_dead_letter_is_explained_and_replayed(browser: Browser, service: Service) -> None:
    """A reply Twilio refused for good is listed with why; Replay sends it once the number works."""
    service.register(BOT_NUMBER, "Citas")
    service.add_operator("ana@example.com", "operator", [])
    service.twilio.fail_always(to=PERSON, status=400, code=21211)
    service.text(BOT_NUMBER, PERSON, "hola")
    page = context(browser).new_page()
    sign_in(page, service, "ana@example.com")
    page.goto(service.base + "/console/dead-letters")
    wait_until(lambda: page.reload() or page.locator("button.replay").count(), what="the dead letter")
    expect(page.locator(".letters .why").first).to_contain_text("not a valid phone number")
    service.twilio.reset()
    page.click("button.replay")
    expect(page.locator(".banner.good")).to_contain_text("1")
    service.twilio.wait_for(1, timeout=60)


def test_an_operator_of_bot_1_cannot_see_or_reach_bot_2(browser: Browser, service: Service) -> None:
    """Bot 2's conversation is not in the inbox, and its URL is a 404 page."""
    first = service.register(BOT_NUMBER, "Citas")
    second = service.register(OTHER_NUMBER, "Ventas")
    service.add_operator("ana@example.com", "operator", [first])
    service.text(BOT_NUMBER, "+15551230001", "hola citas")
    service.text(OTHER_NUMBER, "+15551230002", "hola ventas")
    page = context(browser).new_page()
    sign_in(page, service, "ana@example.com")
    expect(page.locator('[data-person="+15551230001"]')).to_be_visible()
    assert 0 == page.locator('[data-person="+15551230002"]').count()
    answer = page.goto(conversation_url(service, second, "+15551230002"))
    assert answer is not None and 404 == answer.status
    assert 403 == page.goto(service.base + "/console/bots").status  # type: ignore[union-attr]


def test_csrf_and_sessions(browser: Browser, service: Service) -> None:
    """A change without the page's token is refused; signing out on one device signs out the other."""
    bot_id = service.register(BOT_NUMBER, "Citas")
    service.add_operator("ana@example.com", "admin", [])
    phone, laptop = context(browser).new_page(), context(browser).new_page()
    sign_in(phone, service, "ana@example.com")
    sign_in(laptop, service, "ana@example.com")
    phone.goto(conversation_url(service, bot_id))
    forged = phone.evaluate("""url => fetch(url, {method: "POST", body: new FormData()}).then(r => r.status)""",
                            conversation_url(service, bot_id) + "/take-over")
    assert 403 == forged
    expect(phone.locator("#take-over")).to_be_visible()  # nothing changed
    phone.click("button:has-text('Sign out')")
    phone.wait_for_url("**/console/sign-in")
    laptop.goto(service.base + "/console/")
    assert "/console/sign-in" in laptop.url


def test_the_console_in_spanish(browser: Browser, service: Service) -> None:
    """A browser that prefers Spanish gets the pages, the composer's counter and the banners in Spanish."""
    bot_id = service.register(BOT_NUMBER, "Citas")
    service.add_operator("ana@example.com", "operator", [])
    page = context(browser, "es-CO").new_page()
    page.goto(service.base + "/console/")
    expect(page.locator("h1")).to_have_text("Iniciar sesión")
    sign_in(page, service, "ana@example.com")
    expect(page.locator("h1")).to_have_text("Bandeja de entrada")
    service.text(BOT_NUMBER, PERSON, "hola")
    page.locator(f'[data-person="{PERSON}"]').click()
    page.click("#take-over")
    expect(page.locator(".banner.good")).to_contain_text("Tienes la conversación")
    page.fill("#text", "Hola, ¿en qué te ayudo?")
    expect(page.locator("#counter")).to_have_text("23 caracteres · 1 segmento · GSM-7")
    page.click("#send")
    expect(page.locator("#messages .message.out").last).to_contain_text("¿en qué te ayudo?")


def test_past_the_stream_bound_the_inbox_polls(browser: Browser, worker_env: dict[str, str],
                                               redis: redis_lib.Redis, database: str) -> None:
    """With no live stream free (CONSOLE_STREAMS=0) the page is told to poll, and a new text still shows up."""
    with running_service(worker_env, database, CONSOLE_STREAMS="0") as service:
        service.register(BOT_NUMBER, "Citas")
        service.add_operator("ana@example.com", "operator", [])
        page = context(browser).new_page()
        refused = []
        page.on("response", lambda r: refused.append(r.status) if r.url.endswith("/console/live") else None)
        sign_in(page, service, "ana@example.com")
        page.evaluate("window.notReloaded = true")
        service.text(BOT_NUMBER, PERSON, "hola")
        expect(page.locator(f'[data-person="{PERSON}"]')).to_be_visible()
        assert page.evaluate("window.notReloaded === true")
        assert 503 in refused
