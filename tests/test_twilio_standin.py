"""The Twilio stand-in must look like Twilio to the real twilio-python client, and obey its knobs."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from cli.dev import in_background
from cli.twilio_standin import TwilioStandin

ACCOUNT = "AC" + "1" * 32
TOKEN = "auth-token-1"
BOT = "+15550001111"
ALICE = "+15552223333"
BOB = "+15554445555"
OTHER_BOT = "+15556667777"
OTHER_ACCOUNT = "AC" + "2" * 32
OTHER_TOKEN = "auth-token-2"
REPO_ROOT = Path(__file__).resolve().parent.parent

MakeClient = Callable[..., Client]
Callback = tuple[str, dict[str, str], str]  # (url, form, X-Twilio-Signature)


@pytest.fixture
def standin() -> Iterator[TwilioStandin]:
    with TwilioStandin(accounts={ACCOUNT: TOKEN}) as server:
        yield server


@pytest.fixture
def callback_standin() -> Iterator[TwilioStandin]:
    with TwilioStandin(accounts={ACCOUNT: TOKEN}, status_callbacks=True) as server:
        yield server


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """Real twilio-python clients pointed at a stand-in; their pooled sockets are closed afterwards."""
    clients: list[Client] = []

    def make(
        server: TwilioStandin,
        sid: str = ACCOUNT,
        token: str = TOKEN,
        *,
        account_sid: str | None = None,
        timeout: float | None = None,
    ) -> Client:
        client = Client(sid, token, account_sid=account_sid, http_client=TwilioHttpClient(timeout=timeout))
        client.api.base_url = server.url
        clients.append(client)
        return client

    yield make
    for client in clients:
        assert isinstance(client.http_client, TwilioHttpClient) and client.http_client.session is not None
        client.http_client.session.close()


@pytest.fixture
def callback_receiver() -> Iterator[tuple[str, queue.Queue[Callback]]]:
    """A tiny threaded HTTP server that records the status callbacks it receives."""
    received: queue.Queue[Callback] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"])).decode()
            form = {name: values[0] for name, values in parse_qs(raw).items()}
            url = f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"
            received.put((url, form, self.headers.get("X-Twilio-Signature", "")))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with in_background(server, "callback-receiver"):
        yield f"http://127.0.0.1:{server.server_address[1]}", received


def test_send_through_twilio_client_is_accepted_and_recorded(standin: TwilioStandin, make_client: MakeClient) -> None:
    """A twilio-python send gets a Twilio-shaped 201 and is recorded with every field, MediaUrl repeated."""
    media = ["https://example.com/a.png", "https://example.com/b.png"]
    before = time.time()
    sent = make_client(standin).messages.create(
        to=ALICE, from_=BOT, body="hello", media_url=media, status_callback="https://bot.example/status",
        validity_period=60,
    )
    assert re.fullmatch(r"SM[0-9a-f]{32}", sent.sid)
    assert (sent.status, sent.to, sent.from_, sent.body) == ("queued", ALICE, BOT, "hello")
    assert (sent.num_media, sent.num_segments, sent.direction, sent.error_code) == ("2", "1", "outbound-api", None)
    assert sent.uri == f"/2010-04-01/Accounts/{ACCOUNT}/Messages/{sent.sid}.json"
    assert sent.date_created is not None and sent.date_created.tzinfo is not None
    [message] = standin.messages
    assert (message.sid, message.account_sid, message.to, message.from_) == (sent.sid, ACCOUNT, ALICE, BOT)
    assert (message.body, message.media_urls, message.status_callback) == ("hello", media, "https://bot.example/status")
    assert message.form["ValidityPeriod"] == ["60"] and message.form["MediaUrl"] == media
    assert before <= message.received_at <= time.time()


def test_fetch_returns_the_stored_message_and_404_for_unknown_sids(
    standin: TwilioStandin, make_client: MakeClient
) -> None:
    """GET Messages/<sid>.json returns the stored message; an unknown sid is Twilio's 404/20404."""
    client = make_client(standin)
    sent = client.messages.create(to=ALICE, from_=BOT, body="fetch me")
    fetched = client.messages(sent.sid).fetch()
    assert (fetched.sid, fetched.body, fetched.status) == (sent.sid, "fetch me", "queued")
    with pytest.raises(TwilioRestException) as caught:
        client.messages("SM" + "0" * 32).fetch()
    assert (caught.value.status, caught.value.code) == (404, 20404)


@pytest.mark.parametrize(
    ("sid", "token", "path_account"),
    [(ACCOUNT, "wrong-token", None), ("AC" + "9" * 32, TOKEN, None), (ACCOUNT, TOKEN, "AC" + "2" * 32)],
    ids=["wrong-token", "unknown-account", "path-account-differs-from-user"],
)
def test_bad_credentials_raise_401_with_code_20003(
    standin: TwilioStandin, make_client: MakeClient, sid: str, token: str, path_account: str | None
) -> None:
    """Wrong token, unknown account or a path AccountSid other than the auth user all get 401/20003."""
    client = make_client(standin, sid, token, account_sid=path_account)
    with pytest.raises(TwilioRestException) as caught:
        client.messages.create(to=ALICE, from_=BOT, body="hi")
    assert (caught.value.status, caught.value.code) == (401, 20003)
    assert standin.messages == []
    assert [(a.http_status, a.code) for a in standin.attempts] == [(401, 20003)]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"to": "", "from_": BOT, "body": "hi"}, 21604),
        ({"to": ALICE, "body": "hi"}, 21603),
        ({"to": ALICE, "from_": BOT}, 21602),
        ({"to": ALICE, "from_": BOT, "body": "x" * 1601}, 21617),
    ],
    ids=["missing-to", "missing-from", "missing-body-and-media", "body-over-1600"],
)
def test_invalid_sends_are_rejected_with_twilio_400_codes(
    standin: TwilioStandin, make_client: MakeClient, fields: dict[str, str], code: int
) -> None:
    """Twilio's validation errors reach twilio-python as TwilioRestException with status 400 and the code."""
    with pytest.raises(TwilioRestException) as caught:
        make_client(standin).messages.create(**fields)
    assert (caught.value.status, caught.value.code) == (400, code)
    assert standin.messages == []


def test_body_of_exactly_1600_chars_and_media_only_sends_are_accepted(
    standin: TwilioStandin, make_client: MakeClient
) -> None:
    """The 1600-character limit is inclusive, and MediaUrl alone is enough content."""
    client = make_client(standin)
    long = client.messages.create(to=ALICE, from_=BOT, body="x" * 1600)
    media_only = client.messages.create(to=ALICE, from_=BOT, media_url=["https://example.com/a.png"])
    assert (long.num_segments, media_only.body, media_only.num_media) == ("11", "", "1")
    assert len(standin.wait_for(2)) == 2


def test_the_answer_reports_segments_as_twilio_counts_them(standin: TwilioStandin, make_client: MakeClient) -> None:
    """num_segments follows GSM-7 (160/153) and UCS-2 (70/67), as in Twilio's answer."""
    client = make_client(standin)

    counts = [client.messages.create(to=ALICE, from_=BOT, body=body).num_segments
              for body in ("a" * 160, "a" * 161, "¿Cómo estás?" * 6)]

    assert ["1", "2", "2"] == counts


def test_fail_next_returns_429_then_the_retry_is_accepted(standin: TwilioStandin, make_client: MakeClient) -> None:
    """fail_next() answers the next POST with 429/20429 and lets the following one through."""
    client = make_client(standin)
    standin.fail_next()
    with pytest.raises(TwilioRestException) as caught:
        client.messages.create(to=ALICE, from_=BOT, body="retry me")
    assert (caught.value.status, caught.value.code) == (429, 20429)
    client.messages.create(to=ALICE, from_=BOT, body="retry me")
    assert [(a.http_status, a.code, a.body) for a in standin.attempts] == [
        (429, 20429, "retry me"),
        (201, None, "retry me"),
    ]
    assert [m.body for m in standin.messages] == ["retry me"]


def test_fail_next_for_one_recipient_leaves_others_alone(standin: TwilioStandin, make_client: MakeClient) -> None:
    """fail_next(to=...) only consumes POSTs to that recipient."""
    client = make_client(standin)
    standin.fail_next(2, status=400, code=21611, to=BOB)
    client.messages.create(to=ALICE, from_=BOT, body="fine")
    for _ in range(2):
        with pytest.raises(TwilioRestException, match="maximum number of queued messages") as caught:
            client.messages.create(to=BOB, from_=BOT, body="queued out")
        assert caught.value.code == 21611
    client.messages.create(to=BOB, from_=BOT, body="through")
    assert [m.to for m in standin.messages] == [ALICE, BOB]


def test_fail_always_rejects_every_send_to_that_recipient_until_reset(
    standin: TwilioStandin, make_client: MakeClient
) -> None:
    """fail_always(to=..., code=21610) models an opted-out number: every send to it fails, others pass."""
    client = make_client(standin)
    standin.fail_always(to=BOB, code=21610)
    for _ in range(3):
        with pytest.raises(TwilioRestException) as caught:
            client.messages.create(to=BOB, from_=BOT, body="are you there?")
        assert (caught.value.status, caught.value.code) == (400, 21610)
    client.messages.create(to=ALICE, from_=BOT, body="hi")
    standin.reset()
    assert standin.messages == [] and standin.attempts == []
    client.messages.create(to=BOB, from_=BOT, body="after START")
    assert [m.to for m in standin.messages] == [BOB]


def test_delayed_answer_times_out_the_client_but_the_message_is_recorded(
    standin: TwilioStandin, make_client: MakeClient
) -> None:
    """fail_with_delay() makes a client time out although Twilio-side the SMS was already accepted."""
    client = make_client(standin, timeout=0.2)
    standin.fail_with_delay(3.0)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.Timeout):
        client.messages.create(to=ALICE, from_=BOT, body="slow")
    assert time.monotonic() - started < 1.0
    client.messages.create(to=ALICE, from_=BOT, body="fast again")
    assert [m.body for m in standin.messages] == ["slow", "fast again"]


def test_status_callbacks_arrive_signed_in_order(
    callback_standin: TwilioStandin,
    make_client: MakeClient,
    callback_receiver: tuple[str, queue.Queue[Callback]],
) -> None:
    """With status_callbacks, "sent" then "delivered" are POSTed, signed so RequestValidator accepts them."""
    base, received = callback_receiver
    client = make_client(callback_standin)
    sent = client.messages.create(to=ALICE, from_=BOT, body="hi", status_callback=f"{base}/status?bot=7")
    callbacks = [received.get(timeout=5) for _ in range(2)]
    assert [form["MessageStatus"] for _, form, _ in callbacks] == ["sent", "delivered"]
    for url, form, signature in callbacks:
        assert url == f"{base}/status?bot=7"
        assert RequestValidator(TOKEN).validate(url, form, signature)
        assert not RequestValidator("another-token").validate(url, form, signature)
        assert (form["MessageSid"], form["From"], form["To"], form["AccountSid"]) == (sent.sid, BOT, ALICE, ACCOUNT)
        assert "ErrorCode" not in form
    assert client.messages(sent.sid).fetch().status == "delivered"


def test_fail_delivery_reports_undelivered_with_error_code(
    callback_standin: TwilioStandin,
    make_client: MakeClient,
    callback_receiver: tuple[str, queue.Queue[Callback]],
) -> None:
    """fail_delivery(to=...) accepts the send, then calls back "undelivered" with ErrorCode."""
    base, received = callback_receiver
    callback_standin.fail_delivery(to=BOB, code=30003)
    make_client(callback_standin).messages.create(to=BOB, from_=BOT, body="hi", status_callback=f"{base}/s")
    callbacks = [received.get(timeout=5)[1] for _ in range(2)]
    assert [(f["MessageStatus"], f.get("ErrorCode")) for f in callbacks] == [("sent", None), ("undelivered", "30003")]
    assert callback_standin.messages[0].error_code == 30003


def test_http_control_surface_programs_failures_lists_and_resets(
    standin: TwilioStandin, make_client: MakeClient
) -> None:
    """Another process can inject failures, read accepted messages and reset through /_standin/."""
    client = make_client(standin)
    with requests.Session() as http:
        fail = {"count": 1, "status": 429, "code": 20429, "message": "slow down", "to": ALICE}
        assert http.post(f"{standin.url}/_standin/fail", json=fail).status_code == 200
        with pytest.raises(TwilioRestException, match="slow down"):
            client.messages.create(to=ALICE, from_=BOT, body="one")
        sent = client.messages.create(to=ALICE, from_=BOT, body="two")
        [listed] = http.get(f"{standin.url}/_standin/messages").json()
        assert (listed["sid"], listed["to"], listed["from_"], listed["body"]) == (sent.sid, ALICE, BOT, "two")
        assert listed["received_at"] == standin.messages[0].received_at
        assert [a["http_status"] for a in http.get(f"{standin.url}/_standin/attempts").json()] == [429, 201]
        assert http.post(f"{standin.url}/_standin/fail", data="not json").status_code == 400
        assert http.post(f"{standin.url}/_standin/reset").status_code == 200
        assert http.get(f"{standin.url}/_standin/messages").json() == []


def test_dev_mode_accepts_any_credentials_and_echoes_one_line_per_sms(make_client: MakeClient) -> None:
    """Without accounts any credentials pass, and echo gets one readable line per accepted message."""
    lines: list[str] = []
    with TwilioStandin(echo=lines.append) as server:
        client = make_client(server, "AC" + "7" * 32, "whatever")
        client.messages.create(to=ALICE, from_=BOT, body="hello\nthere", media_url=["https://example.com/a.png"])
        with pytest.raises(TwilioRestException):
            client.messages.create(to="", from_=BOT, body="rejected sends are not echoed")
        client.http_client.session.close()  # type: ignore[attr-defined]
    assert lines == [f"SMS {BOT} -> {ALICE}: hello\\nthere [media: https://example.com/a.png]"]


def test_wait_for_raises_naming_how_many_arrived(standin: TwilioStandin, make_client: MakeClient) -> None:
    """wait_for() fails with an AssertionError that says how many messages did arrive."""
    make_client(standin).messages.create(to=ALICE, from_=BOT, body="only one")
    assert len(standin.wait_for(1, timeout=0.1)) == 1
    with pytest.raises(AssertionError, match=r"at least 2 .* but 1 arrived"):
        standin.wait_for(2, timeout=0.05)


def test_sixteen_concurrent_clients_are_all_served(standin: TwilioStandin, make_client: MakeClient) -> None:
    """Sixteen clients sending at once are all accepted, each message once, with distinct sids."""
    clients = [make_client(standin, timeout=5) for _ in range(16)]
    barrier = threading.Barrier(len(clients))
    errors: list[BaseException] = []

    def send(index: int, client: Client) -> None:
        barrier.wait()
        try:
            for n in range(5):
                client.messages.create(to=ALICE, from_=BOT, body=f"{index}-{n}")
        except BaseException as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i, c)) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    messages = standin.wait_for(80, timeout=1)
    assert len({m.sid for m in messages}) == 80 and len({m.body for m in messages}) == 80
    arrivals = [m.received_at for m in messages]
    assert arrivals == sorted(arrivals)


def test_many_requests_do_not_leak_handler_threads(standin: TwilioStandin) -> None:
    """Hundreds of one-shot connections leave no handler threads behind."""
    baseline = threading.active_count()
    url = f"{standin.url}/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    for n in range(300):
        response = requests.post(
            url, data={"To": ALICE, "From": BOT, "Body": str(n)}, auth=(ACCOUNT, TOKEN), headers={"Connection": "close"}
        )
        assert response.status_code == 201
    assert len(standin.messages) == 300
    deadline = time.monotonic() + 2
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= baseline


def test_stop_is_prompt_with_idle_keepalive_connections_open() -> None:
    """stop() closes idle keep-alive connections instead of waiting for their idle timeout."""
    baseline = threading.active_count()
    server = TwilioStandin().start()
    with requests.Session() as http:
        for _ in range(3):
            assert http.get(f"{server.url}/_standin/messages").status_code == 200
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
    assert threading.active_count() == baseline, threading.enumerate()


def test_module_runs_in_foreground_and_stops_on_sigterm() -> None:
    """`python -m cli.twilio_standin --port 0` prints its URL, echoes sends, and exits 0 on SIGTERM."""
    command = [sys.executable, "-m", "cli.twilio_standin", "--port", "0"]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()
            match = re.search(r"http://127\.0\.0\.1:\d+", banner)
            assert match, banner
            response = requests.post(
                f"{match.group()}/2010-04-01/Accounts/{ACCOUNT}/Messages.json",
                data={"To": ALICE, "From": BOT, "Body": "from the bot"},
                auth=(ACCOUNT, "any-token"),
            )
            assert response.status_code == 201
            assert process.stdout.readline() == f"SMS {BOT} -> {ALICE}: from the bot\n"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0
        finally:
            process.kill()


def test_context_manager_accepts_an_already_started_standin() -> None:
    """`with TwilioStandin().start() as s:` works: entering does not start a second server."""
    with TwilioStandin().start() as server:
        assert requests.get(f"{server.url}/_standin/messages").json() == []
    with pytest.raises(RuntimeError, match="already started"):
        server.start().start()
    server.stop()


# -- listing Messages.json, as a worker checks whether Twilio took a send ----------------------


def _list_url(server: TwilioStandin, account: str = ACCOUNT) -> str:
    return f"{server.url}/2010-04-01/Accounts/{account}/Messages.json"


def test_list_filters_by_from_and_to_newest_first(make_client: MakeClient) -> None:
    """From/To select the account's own matching messages, newest first, shaped like create's answer."""
    with TwilioStandin(accounts={ACCOUNT: TOKEN, OTHER_ACCOUNT: OTHER_TOKEN}) as server:
        client, other = make_client(server), make_client(server, OTHER_ACCOUNT, OTHER_TOKEN)
        created = {}
        for to, from_, body in [(ALICE, BOT, "a1"), (BOB, BOT, "b1"), (ALICE, OTHER_BOT, "x1"), (ALICE, BOT, "a2")]:
            created[body] = client.messages.create(to=to, from_=from_, body=body)
        other.messages.create(to=ALICE, from_=BOT, body="another account's")

        listed = client.messages.list(from_=BOT, to=ALICE)

        assert [m.body for m in listed] == ["a2", "a1"]
        newest = listed[0]
        assert (newest.sid, newest.to, newest.from_, newest.status) == (created["a2"].sid, ALICE, BOT, "queued")
        assert (newest.date_sent, newest.date_created, newest.num_segments) == (None, created["a2"].date_created, "1")
        assert [m.body for m in client.messages.list(to=ALICE)] == ["a2", "x1", "a1"]
        assert [m.body for m in client.messages.list(from_=BOT)] == ["a2", "b1", "a1"]
        assert [m.body for m in client.messages.list()] == ["a2", "x1", "b1", "a1"]
        assert client.messages.list(to=BOB, from_=OTHER_BOT) == []
        assert [m.body for m in other.messages.list()] == ["another account's"]


def test_list_pages_120_messages_by_50_each_exactly_once(standin: TwilioStandin, make_client: MakeClient) -> None:
    """twilio-python's list() follows next_page_uri through 50+50+20, and a send mid-paging shifts nothing."""
    client = make_client(standin)
    sids = [client.messages.create(to=ALICE, from_=BOT, body=str(n)).sid for n in range(120)]
    client.messages.create(to=BOB, from_=BOT, body="filtered out")

    listed = client.messages.list(to=ALICE, limit=None, page_size=50)

    assert [m.sid for m in listed] == sids[::-1]
    first = client.messages.page(to=ALICE, page_size=50)
    second = first.next_page()
    client.messages.create(to=ALICE, from_=BOT, body="arrives while paging")  # lands on top, not mid-list
    third = second.next_page()
    pages = [[m.sid for m in page] for page in (first, second, third)]
    assert [len(page) for page in pages] == [50, 50, 20]
    assert sum(pages, []) == sids[::-1]
    assert third.next_page() is None and first.previous_page() is None
    assert [m.sid for m in second.previous_page()] == pages[0]


def test_list_answers_with_twilios_page_envelope(standin: TwilioStandin, make_client: MakeClient) -> None:
    """The JSON page carries Twilio's keys; next_page_uri is an absolute path keeping the filters."""
    client = make_client(standin)
    for n in range(3):
        client.messages.create(to=ALICE, from_=BOT, body=str(n))
    with requests.Session() as http:
        http.auth = (ACCOUNT, TOKEN)
        page = http.get(_list_url(standin), params={"To": ALICE, "PageSize": 2}).json()
        base = f"/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
        assert set(page) == {
            "messages", "next_page_uri", "page", "page_size", "uri",
            "first_page_uri", "previous_page_uri", "start", "end",
        }
        assert (page["page"], page["page_size"], page["start"], page["end"]) == (0, 2, 0, 1)
        assert page["uri"] == page["first_page_uri"] == f"{base}?To=%2B15552223333&PageSize=2&Page=0"
        assert page["previous_page_uri"] is None
        token = "PA" + page["messages"][-1]["sid"]
        assert page["next_page_uri"] == f"{base}?To=%2B15552223333&PageSize=2&Page=1&PageToken={token}"
        last = http.get(standin.url + page["next_page_uri"]).json()
        assert ([m["body"] for m in last["messages"]], last["next_page_uri"]) == (["0"], None)
        assert (last["page"], last["start"], last["end"]) == (1, 2, 2)
        back = "PB" + last["messages"][0]["sid"]
        assert last["previous_page_uri"] == f"{base}?To=%2B15552223333&PageSize=2&Page=0&PageToken={back}"
        assert http.get(_list_url(standin)).json()["page_size"] == 50
        assert http.get(_list_url(standin), params={"PageSize": 5000}).json()["page_size"] == 1000
        for bad in ({"PageSize": "0"}, {"Page": "-1"}, {"PageToken": "nonsense"}, {"PageToken": "PASM" + "0" * 32}):
            answer = http.get(_list_url(standin), params=bad)
            assert (answer.status_code, answer.json()["code"]) == (400, 20001), bad


def test_list_filters_on_the_day_of_date_sent(
    make_client: MakeClient, callback_receiver: tuple[str, queue.Queue[Callback]]
) -> None:
    """DateSent, DateSent< and DateSent> compare date_sent's UTC day, inclusively; unsent messages never match."""
    base, received = callback_receiver
    now = [0.0]
    with TwilioStandin(accounts={ACCOUNT: TOKEN}, status_callbacks=True, clock=lambda: now[0]) as server:
        client = make_client(server)
        moments = {
            "day1": datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc),
            "day2-late": datetime(2024, 3, 2, 23, 59, 59, tzinfo=timezone.utc),
            "day3-midnight": datetime(2024, 3, 3, 0, 0, 0, tzinfo=timezone.utc),
        }
        for body, moment in moments.items():
            now[0] = moment.timestamp()
            client.messages.create(to=ALICE, from_=BOT, body=body, status_callback=f"{base}/s")
            assert [received.get(timeout=5)[1]["MessageStatus"] for _ in range(2)] == ["sent", "delivered"]
        client.messages.create(to=ALICE, from_=BOT, body="still queued")  # no callback: date_sent stays empty

        def bodies(**filters: Any) -> list[str]:
            return [m.body for m in client.messages.list(**filters)]

        listed = client.messages.list()
        assert [(m.body, m.date_sent) for m in listed] == [("still queued", None)] + [
            (body, moment) for body, moment in reversed(moments.items())
        ]
        # twilio-python sends a datetime as 2024-03-02T00:00:00Z; only its day counts.
        assert bodies(date_sent=datetime(2024, 3, 2, 0, 0)) == ["day2-late"]
        assert bodies(date_sent="2024-03-02") == ["day2-late"]
        assert bodies(date_sent_before=datetime(2024, 3, 2, 0, 0)) == ["day2-late", "day1"]
        assert bodies(date_sent_after=datetime(2024, 3, 2, 23, 59, 59)) == ["day3-midnight", "day2-late"]
        assert bodies(date_sent_after=date(2024, 3, 2), date_sent_before="2024-03-02") == ["day2-late"]
        assert bodies(date_sent_after="2024-03-04") == []
        with requests.Session() as http:
            answer = http.get(_list_url(server), params={"DateSent>": ">=2024-03-01"}, auth=(ACCOUNT, TOKEN))
            assert (answer.status_code, answer.json()["code"]) == (400, 20001)


def test_list_requires_the_accounts_own_credentials(make_client: MakeClient) -> None:
    """No or wrong credentials get 401/20003; good credentials on another account's path get 404/20404."""
    with TwilioStandin(accounts={ACCOUNT: TOKEN, OTHER_ACCOUNT: OTHER_TOKEN}) as server:
        make_client(server).messages.create(to=ALICE, from_=BOT, body="private")
        with requests.Session() as http:
            anonymous = http.get(_list_url(server))
            assert (anonymous.status_code, anonymous.json()["code"]) == (401, 20003)
            assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="Twilio API"'
            wrong = http.get(_list_url(server), auth=(ACCOUNT, "wrong-token"))
            assert (wrong.status_code, wrong.json()["code"]) == (401, 20003)
            unknown = http.get(_list_url(server, "AC" + "9" * 32), auth=("AC" + "9" * 32, TOKEN))
            assert (unknown.status_code, unknown.json()["code"]) == (401, 20003)
            foreign = http.get(_list_url(server), auth=(OTHER_ACCOUNT, OTHER_TOKEN))
            assert (foreign.status_code, foreign.json()["code"]) == (404, 20404)
            assert "private" not in foreign.text
        # twilio-python reports a failed page as TwilioException("Unable to fetch page", response).
        for client, status in [
            (make_client(server, ACCOUNT, "wrong-token"), 401),
            (make_client(server, OTHER_ACCOUNT, OTHER_TOKEN, account_sid=ACCOUNT), 404),
        ]:
            with pytest.raises(TwilioException, match="Unable to fetch page") as caught:
                client.messages.list(to=ALICE)
            assert caught.value.args[1].status_code == status


# -- lost answers: Twilio accepted, the client never heard ------------------------------------


def test_accept_then_drop_hangs_up_yet_the_message_is_listed_counted_and_called_back(
    callback_standin: TwilioStandin,
    make_client: MakeClient,
    callback_receiver: tuple[str, queue.Queue[Callback]],
) -> None:
    """accept_then_drop(to=...) stores the send, runs its callbacks, then closes without any answer."""
    base, received = callback_receiver
    client = make_client(callback_standin, timeout=5)
    callback_standin.accept_then_drop(to=BOB)
    client.messages.create(to=ALICE, from_=BOT, body="not for bob")  # another recipient: answered
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError, match="RemoteDisconnected") as caught:
        client.messages.create(to=BOB, from_=BOT, body="did it go?", status_callback=f"{base}/s")
    assert not isinstance(caught.value, requests.exceptions.Timeout)
    assert time.monotonic() - started < 1.0
    [listed] = client.messages.list(from_=BOT, to=BOB)
    assert (listed.body, listed.to) == ("did it go?", BOB)
    assert [m.body for m in callback_standin.messages] == ["not for bob", "did it go?"]
    assert [(a.http_status, a.lost) for a in callback_standin.attempts] == [(201, None), (201, "drop")]
    callbacks = [received.get(timeout=5)[1] for _ in range(2)]
    assert [(f["MessageSid"], f["MessageStatus"]) for f in callbacks] == [
        (listed.sid, "sent"), (listed.sid, "delivered"),
    ]
    client.messages.create(to=BOB, from_=BOT, body="answered again")  # count=1 is used up
    assert len(callback_standin.messages) == 3


def test_accept_then_delay_times_the_client_out_yet_the_message_is_listed(
    standin: TwilioStandin, make_client: MakeClient
) -> None:
    """accept_then_delay() past a 1 s read timeout: the client times out, the message is already listed."""
    client = make_client(standin, timeout=1)
    standin.accept_then_delay(3.0, to=ALICE)
    standin.fail_next(to=ALICE)
    with pytest.raises(TwilioRestException):  # answered at once: a rejected send does not use up the rule
        client.messages.create(to=ALICE, from_=BOT, body="rejected")
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        client.messages.create(to=ALICE, from_=BOT, body="late")
    assert 0.9 < time.monotonic() - started < 2.5
    [listed] = client.messages.list(to=ALICE)
    assert (listed.body, listed.status) == ("late", "queued")
    assert [(a.http_status, a.lost) for a in standin.attempts] == [(429, None), (201, "late")]
    started = time.monotonic()
    client.messages.create(to=ALICE, from_=BOT, body="prompt")
    assert time.monotonic() - started < 0.5


def test_lost_answers_are_programmed_over_http_and_cleared_by_reset(
    standin: TwilioStandin, make_client: MakeClient
) -> None:
    """/_standin/accept_then_drop and /_standin/accept_then_delay program the rules; reset() clears them."""
    client = make_client(standin, timeout=1)
    with requests.Session() as http:
        assert http.post(f"{standin.url}/_standin/accept_then_drop", json={"count": 2, "to": BOB}).status_code == 200
        for _ in range(2):
            with pytest.raises(requests.exceptions.ConnectionError):
                client.messages.create(to=BOB, from_=BOT, body="dropped")
        client.messages.create(to=BOB, from_=BOT, body="answered")
        assert http.post(f"{standin.url}/_standin/accept_then_delay", json={"seconds": 3}).status_code == 200
        with pytest.raises(requests.exceptions.ReadTimeout):
            client.messages.create(to=ALICE, from_=BOT, body="late")
        assert [m.body for m in client.messages.list()] == ["late", "answered", "dropped", "dropped"]
        for path, spec in [("accept_then_drop", {"count": 0}), ("accept_then_delay", {"count": 1})]:
            assert http.post(f"{standin.url}/_standin/{path}", json=spec).status_code == 400
        assert http.post(f"{standin.url}/_standin/accept_then_drop", json={"count": 5}).status_code == 200
        late = {"seconds": 3, "count": 5}
        assert http.post(f"{standin.url}/_standin/accept_then_delay", json=late).status_code == 200
    standin.accept_then_drop(5)
    standin.accept_then_delay(3.0, 5, to=ALICE)
    standin.reset()
    started = time.monotonic()
    client.messages.create(to=ALICE, from_=BOT, body="after reset")
    assert time.monotonic() - started < 0.5
    assert [(a.http_status, a.lost) for a in standin.attempts] == [(201, None)]


def test_stop_does_not_wait_for_a_late_answer(make_client: MakeClient) -> None:
    """stop() during accept_then_delay returns at once; the client gets a hang-up, never the late 201."""
    server = TwilioStandin().start()
    client = make_client(server, timeout=30)
    server.accept_then_delay(30.0)
    outcome: list[BaseException | str] = []

    def send() -> None:
        try:
            outcome.append(client.messages.create(to=ALICE, from_=BOT, body="never answered").sid)
        except BaseException as exc:  # checked below
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    server.wait_for(1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    sender.join(5)
    assert not sender.is_alive()
    [error] = outcome
    assert isinstance(error, requests.exceptions.ConnectionError), error


# -- Messaging Services: a pool of senders behind one MG SID ----------------------------------

SERVICE = "MG" + "3" * 32
POOL = ("+15550000001", "+15550000002")
CAROL = "+15558889999"


@pytest.fixture
def service_standin() -> Iterator[TwilioStandin]:
    with TwilioStandin(accounts={ACCOUNT: TOKEN}, status_callbacks=True, services={SERVICE: POOL}) as server:
        yield server


def test_service_send_is_answered_accepted_without_a_sender_then_shows_the_one_picked(
    service_standin: TwilioStandin, make_client: MakeClient
) -> None:
    """Twilio answers a MessagingServiceSid send before picking a sender: "accepted", from null, 0 segments;
    fetch and the record then show the sender picked from the pool (twilio-python docstrings, messaging-services.md)."""
    client = make_client(service_standin)

    sent = client.messages.create(to=ALICE, messaging_service_sid=SERVICE, body="hola")

    assert (sent.status, sent.from_, sent.num_segments, sent.messaging_service_sid) == ("accepted", None, "0", SERVICE)
    fetched = client.messages(sent.sid).fetch()
    assert (fetched.status, fetched.from_, fetched.num_segments) == ("queued", POOL[0], "1")
    [message] = service_standin.messages
    assert (message.from_, message.messaging_service_sid, "From" in message.form) == (POOL[0], SERVICE, False)
    [attempt] = service_standin.attempts
    assert (attempt.from_, attempt.messaging_service_sid, attempt.http_status) == (None, SERVICE, 201)


def test_sticky_sender_keeps_each_recipient_on_its_sender_while_it_stays_in_the_pool(
    service_standin: TwilioStandin, make_client: MakeClient
) -> None:
    """New recipients take the pool's senders in turn; a recipient keeps its sender until it leaves the pool."""
    client = make_client(service_standin)

    def sender(to: str) -> str | None:
        sent = client.messages.create(to=to, messaging_service_sid=SERVICE, body="hi")
        return client.messages(sent.sid).fetch().from_

    assert [sender(to) for to in (ALICE, BOB, ALICE, CAROL, BOB, ALICE)] == [
        POOL[0], POOL[1], POOL[0], POOL[0], POOL[1], POOL[0],
    ]
    service_standin.set_service(SERVICE, [POOL[1], OTHER_BOT])  # ALICE's and CAROL's sender leaves the pool
    assert [sender(to) for to in (BOB, ALICE, ALICE, CAROL)] == [POOL[1], OTHER_BOT, OTHER_BOT, POOL[1]]
    assert [m.from_ for m in client.messages.list(to=ALICE)] == [OTHER_BOT, OTHER_BOT, POOL[0], POOL[0], POOL[0]]


def test_a_from_in_the_pool_is_used_and_one_outside_it_is_refused_with_21711(
    service_standin: TwilioStandin, make_client: MakeClient
) -> None:
    """With a service, a given From must be one of its senders (error 21711 otherwise); it is used as given."""
    client = make_client(service_standin)

    chosen = client.messages.create(to=ALICE, from_=POOL[1], messaging_service_sid=SERVICE, body="from two")
    with pytest.raises(TwilioRestException) as caught:
        client.messages.create(to=ALICE, from_=OTHER_BOT, messaging_service_sid=SERVICE, body="not in the pool")

    assert (chosen.status, chosen.from_, chosen.messaging_service_sid) == ("accepted", POOL[1], SERVICE)
    assert (caught.value.status, caught.value.code) == (400, 21711)
    assert [(m.from_, m.body) for m in service_standin.messages] == [(POOL[1], "from two")]
    # An explicit From does not make a sender sticky: ALICE's first pooled send still gets the pool's first.
    pooled = client.messages.create(to=ALICE, messaging_service_sid=SERVICE, body="pooled")
    assert POOL[0] == client.messages(pooled.sid).fetch().from_


def test_a_service_sid_given_as_from_sends_through_that_service(
    service_standin: TwilioStandin, make_client: MakeClient
) -> None:
    """Twilio's 21603 page: From may carry a Messaging Service SID instead of MessagingServiceSid."""
    sent = make_client(service_standin).messages.create(to=ALICE, from_=SERVICE, body="hi")
    assert (sent.status, sent.from_, sent.messaging_service_sid) == ("accepted", None, SERVICE)
    assert [(m.from_, m.messaging_service_sid) for m in service_standin.messages] == [(POOL[0], SERVICE)]


@pytest.mark.parametrize(
    ("service", "code"),
    [("MG" + "9" * 32, 21701), ("MG123", 21705), ("PN" + "3" * 32, 21705)],
    ids=["unknown", "too-short", "not-an-MG-sid"],
)
def test_an_unknown_or_malformed_service_is_refused(
    service_standin: TwilioStandin, make_client: MakeClient, service: str, code: int
) -> None:
    """A well-formed SID of no service gets 21701 (does not exist), a malformed one 21705 (invalid)."""
    with pytest.raises(TwilioRestException) as caught:
        make_client(service_standin).messages.create(to=ALICE, messaging_service_sid=service, body="hi")
    assert (caught.value.status, caught.value.code) == (400, code)
    assert service_standin.messages == []
    assert [(a.messaging_service_sid, a.code) for a in service_standin.attempts] == [(service, code)]


def test_service_callbacks_report_queued_sent_delivered_with_the_service_and_sender_signed(
    service_standin: TwilioStandin,
    make_client: MakeClient,
    callback_receiver: tuple[str, queue.Queue[Callback]],
) -> None:
    """No callback for "accepted"; then "queued", "sent", "delivered", each naming the service and the
    picked sender, signed so RequestValidator accepts them."""
    base, received = callback_receiver
    client = make_client(service_standin)

    sent = client.messages.create(to=BOB, messaging_service_sid=SERVICE, body="hi", status_callback=f"{base}/s?b=1")

    callbacks = [received.get(timeout=5) for _ in range(3)]
    assert [form["MessageStatus"] for _, form, _ in callbacks] == ["queued", "sent", "delivered"]
    for url, form, signature in callbacks:
        assert RequestValidator(TOKEN).validate(url, form, signature)
        assert (form["MessageSid"], form["MessagingServiceSid"], form["From"], form["To"]) == (
            sent.sid, SERVICE, POOL[0], BOB,
        )
        assert "ErrorCode" not in form
    assert client.messages(sent.sid).fetch().status == "delivered"


def test_validity_period_smart_encoded_and_shorten_urls_are_recorded_as_sent(
    service_standin: TwilioStandin, make_client: MakeClient
) -> None:
    """The send options are kept per message, typed, and listed over HTTP; absent ones are None."""
    client = make_client(service_standin)

    client.messages.create(
        to=ALICE, messaging_service_sid=SERVICE, body="see https://example.com", validity_period=600,
        smart_encoded=True, shorten_urls=True,
    )
    client.messages.create(to=BOB, messaging_service_sid=SERVICE, body="plain", smart_encoded=False)
    client.messages.create(to=BOB, from_=BOT, body="no service")

    options = [(m.validity_period, m.smart_encoded, m.shorten_urls) for m in service_standin.messages]
    assert options == [(600, True, True), (None, False, None), (None, None, None)]
    assert service_standin.messages[0].form["ShortenUrls"] == ["true"]
    listed = requests.get(f"{service_standin.url}/_standin/messages").json()
    assert [(m["validity_period"], m["smart_encoded"], m["shorten_urls"]) for m in listed] == options
    assert [m["messaging_service_sid"] for m in listed] == [SERVICE, SERVICE, None]


def test_shorten_urls_without_a_service_is_refused(standin: TwilioStandin, make_client: MakeClient) -> None:
    """Twilio's docs: ShortenUrls=true needs a MessagingServiceSid; without one the send fails (30124).
    ShortenUrls=false needs nothing."""
    client = make_client(standin)
    with pytest.raises(TwilioRestException) as caught:
        client.messages.create(to=ALICE, from_=BOT, body="https://example.com", shorten_urls=True)
    client.messages.create(to=ALICE, from_=BOT, body="https://example.com", shorten_urls=False)
    assert (caught.value.status, caught.value.code) == (400, 30124)
    assert [m.shorten_urls for m in standin.messages] == [False]


def test_queue_overflow_accepts_a_services_sends_then_fails_them_with_30001(
    service_standin: TwilioStandin,
    make_client: MakeClient,
    callback_receiver: tuple[str, queue.Queue[Callback]],
) -> None:
    """queue_overflow(service): the send is accepted, then called back "failed" with ErrorCode 30001
    (where a number alone answers 21611); switched off, sends are delivered again."""
    base, received = callback_receiver
    client = make_client(service_standin)
    service_standin.queue_overflow(SERVICE)

    sent = client.messages.create(to=ALICE, messaging_service_sid=SERVICE, body="hi", status_callback=f"{base}/s")
    plain = client.messages.create(to=BOB, from_=BOT, body="not through the service", status_callback=f"{base}/p")

    assert sent.status == "accepted"
    callbacks = [received.get(timeout=5) for _ in range(4)]
    by_path = {path: [(f["MessageStatus"], f.get("ErrorCode")) for u, f, _ in callbacks if u.endswith(path)]
               for path in ("/s", "/p")}
    assert by_path == {"/s": [("queued", None), ("failed", "30001")], "/p": [("sent", None), ("delivered", None)]}
    failed = client.messages(sent.sid).fetch()
    assert (failed.status, failed.error_code, failed.date_sent) == ("failed", 30001, None)
    assert client.messages(plain.sid).fetch().status == "delivered"
    service_standin.queue_overflow(SERVICE, on=False)
    client.messages.create(to=ALICE, messaging_service_sid=SERVICE, body="again", status_callback=f"{base}/s")
    assert [received.get(timeout=5)[1]["MessageStatus"] for _ in range(3)] == ["queued", "sent", "delivered"]


def test_fail_after_accept_reports_a_late_21610_for_an_opted_out_recipient(
    service_standin: TwilioStandin,
    make_client: MakeClient,
    callback_receiver: tuple[str, queue.Queue[Callback]],
) -> None:
    """fail_after_accept(to=...): the send is accepted, then called back "failed" with ErrorCode 21610,
    as a Messaging Service send to an opted-out recipient fails; other recipients are unaffected."""
    base, received = callback_receiver
    client = make_client(service_standin)
    service_standin.fail_after_accept(to=BOB)

    sent = client.messages.create(to=BOB, messaging_service_sid=SERVICE, body="hi", status_callback=f"{base}/s")

    assert sent.status == "accepted"
    callbacks = [received.get(timeout=5)[1] for _ in range(2)]
    assert [(f["MessageStatus"], f.get("ErrorCode"), f["MessagingServiceSid"]) for f in callbacks] == [
        ("queued", None, SERVICE), ("failed", "21610", SERVICE),
    ]
    assert (service_standin.messages[0].status, service_standin.messages[0].error_code) == ("failed", 21610)
    client.messages.create(to=ALICE, messaging_service_sid=SERVICE, body="hi", status_callback=f"{base}/s")
    assert [received.get(timeout=5)[1]["MessageStatus"] for _ in range(3)] == ["queued", "sent", "delivered"]


def test_services_and_late_failures_are_programmed_over_http_and_reset_keeps_the_services(
    callback_standin: TwilioStandin,
    make_client: MakeClient,
    callback_receiver: tuple[str, queue.Queue[Callback]],
) -> None:
    """/_standin/services, /queue_overflow and /fail_after_accept program another process's stand-in;
    reset() clears the failures and the sticky senders but keeps the services."""
    base, received = callback_receiver
    client = make_client(callback_standin)

    def statuses(to: str) -> list[tuple[str, str | None]]:
        client.messages.create(to=to, messaging_service_sid=SERVICE, body="hi", status_callback=f"{base}/s")
        forms = [received.get(timeout=5)[1]]
        while forms[-1]["MessageStatus"] not in ("delivered", "failed"):
            forms.append(received.get(timeout=5)[1])
        return [(f["MessageStatus"], f.get("ErrorCode")) for f in forms]

    with requests.Session() as http:
        control = callback_standin.url + "/_standin"
        assert http.post(f"{control}/services", json={"sid": SERVICE, "numbers": list(POOL)}).status_code == 200
        assert http.post(f"{control}/queue_overflow", json={"service": SERVICE}).status_code == 200
        assert statuses(ALICE) == [("queued", None), ("failed", "30001")]
        assert http.post(f"{control}/queue_overflow", json={"service": SERVICE, "on": False}).status_code == 200
        assert http.post(f"{control}/fail_after_accept", json={"to": BOB, "code": 21610}).status_code == 200
        assert statuses(BOB) == [("queued", None), ("failed", "21610")]
        for path, spec in [("services", {"sid": "MG1", "numbers": ["+1"]}), ("services", {"sid": SERVICE}),
                           ("services", {"sid": SERVICE, "numbers": []}), ("fail_after_accept", {"code": 21610})]:
            assert http.post(f"{control}/{path}", json=spec).status_code == 400, (path, spec)
        assert http.post(f"{control}/reset").status_code == 200
    assert statuses(BOB) == [("queued", None), ("sent", None), ("delivered", None)]
    assert [m.from_ for m in callback_standin.messages] == [POOL[0]]  # BOB is first again: stickiness forgotten


def test_module_serves_the_services_given_on_the_command_line() -> None:
    """`--service MG...:+1...,+1...` registers a pool; the echoed line names the sender it picked."""
    command = [sys.executable, "-m", "cli.twilio_standin", "--port", "0", "--service", f"{SERVICE}:{','.join(POOL)}"]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            match = re.search(r"http://127\.0\.0\.1:\d+", process.stdout.readline())
            assert match
            response = requests.post(
                f"{match.group()}/2010-04-01/Accounts/{ACCOUNT}/Messages.json",
                data={"To": ALICE, "MessagingServiceSid": SERVICE, "Body": "pooled"},
                auth=(ACCOUNT, "any-token"),
            )
            assert (response.status_code, response.json()["status"], response.json()["from"]) == (201, "accepted", None)
            assert process.stdout.readline() == f"SMS {POOL[0]} -> {ALICE} via {SERVICE}: pooled\n"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0
        finally:
            process.kill()
    for bad_pool in ("+15550000001", f"{SERVICE}:", f"MG123:{POOL[0]}"):
        bad = subprocess.run([*command[:-1], bad_pool], cwd=REPO_ROOT, capture_output=True, text=True)
        assert bad.returncode == 2 and "--service takes MG_SID:NUMBER,NUMBER" in bad.stderr, bad_pool
