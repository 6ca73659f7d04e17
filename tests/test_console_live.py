"""Live console streams are bounded per web process, so open console tabs never take the threads
Twilio's webhook needs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import time
import uuid

import pytest
import redis as redis_lib
import requests
from flask.testing import FlaskClient

from shared import keys, news
from shared.bots import Bot
from tests.conftest import BOT_NUMBER
from tests.support.console import Service, running_service
from tests.test_status_callbacks import RECIPIENT, callback, post_status

STREAMS = 50


@pytest.fixture
def service(worker_env: dict[str, str], redis: redis_lib.Redis, database: str) -> Iterator[Service]:
    """The web process as deployed (WEB_THREADS 4), with one live stream allowed."""
    with running_service(worker_env, database, worker=False, WEB_THREADS="4", CONSOLE_STREAMS="1",
                         WEB_CONCURRENCY="1") as running:
        yield running


def test_fifty_open_console_streams_leave_the_webhook_answering(service: Service) -> None:
    """With 50 tabs holding /console/live open, a signed webhook is still answered, and the tabs past
    the bound are told to poll (503) instead of holding a thread."""
    bot_id = service.register(BOT_NUMBER, "bot")
    service.add_operator("ana@example.com", "operator", [bot_id])
    session = service.signed_in("ana@example.com")
    cookies = session.cookies.get_dict()
    statuses: list[int] = []
    opened = threading.Barrier(STREAMS + 1, timeout=120)
    held: list[requests.Response] = []
    lock = threading.Lock()

    def tab() -> None:
        response = requests.get(service.base + "/console/live", cookies=cookies, stream=True, timeout=120)
        with lock:
            statuses.append(response.status_code)
            held.append(response)
        opened.wait()

    tabs = [threading.Thread(target=tab, daemon=True) for _ in range(STREAMS)]
    for thread in tabs:
        thread.start()
    opened.wait()
    try:
        # When Twilio posts while every tab is open
        answer = service.text(BOT_NUMBER, "+15551230001", "hola")
    finally:
        for response in held:
            response.close()
    # Then the webhook answered, one tab streams and the others were sent to polling
    assert 200 == answer.status_code
    assert (1, STREAMS - 1) == (statuses.count(200), statuses.count(503))


def notices(pubsub: redis_lib.client.PubSub) -> list[str]:
    """The notices published so far, as sent (waiting a little for the first)."""
    found, deadline = [], time.monotonic() + 5
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is None and found:
            break
        if message is not None and message["type"] == "message":
            found.append(message["data"])
    return found


def announced(pubsub: redis_lib.client.PubSub) -> list[tuple[int | None, str | None]]:
    """The conversations the news published so far names."""
    return [change for raw in notices(pubsub) for change in news.read(raw)]


def test_a_status_callback_a_handoff_and_an_operators_send_are_announced_to_open_pages(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot, redis: redis_lib.Redis) -> None:
    """Each change a page shows is published on the console's channel with its bot and person."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CONSOLE_NEWS_CHANNEL)
    user = f"/app:mammut-1/graph/user:{bot.id}"

    post_status(client, callback("SM" + uuid.uuid4().hex, "delivered"))
    delivered = announced(pubsub)
    client.post(f"{user}/conversations/{RECIPIENT}/handoff", headers=admin_headers)
    paused = announced(pubsub)
    client.delete(f"{user}/conversations/{RECIPIENT}/handoff", headers=admin_headers)
    resumed = announced(pubsub)
    client.post(f"{user}/messages", headers=admin_headers, json={"to": RECIPIENT, "text": "hola"})
    sent = announced(pubsub)
    pubsub.close()

    assert [[(bot.id, RECIPIENT)]] * 4 == [delivered, paused, resumed, sent]


def test_the_log_drain_announces_the_conversations_it_wrote(redis: redis_lib.Redis, settings: object) -> None:
    """Once the log shows a new message the conversation is announced; an outcome (which names only
    its reply) is announced as some conversation."""
    from shared.db import get_engine
    from tests.test_logdrain import PERSON, exchange
    from worker.logdrain import drain, outcome_record

    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CONSOLE_NEWS_CHANNEL)
    redis.rpush(keys.LOG_OUTBOX, exchange("SM1", "hi"))
    drain(redis, get_engine(settings))  # type: ignore[arg-type]
    written = announced(pubsub)
    redis.rpush(keys.LOG_OUTBOX, outcome_record("SM1-0", "queued", sid="SMout1"))
    drain(redis, get_engine(settings))  # type: ignore[arg-type]
    settled = announced(pubsub)
    pubsub.close()
    assert ([(1, PERSON)], [(None, None)]) == (written, settled)


def test_the_log_drain_announces_a_whole_batch_in_one_notice(redis: redis_lib.Redis, settings: object) -> None:
    """A batch of the log naming three people and an outcome is one notice (one round trip, not four),
    which names each of them."""
    from shared.db import get_engine
    from tests.test_logdrain import PERSON, exchange
    from worker.logdrain import drain, outcome_record

    others = ["+15551230101", "+15551230102"]
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CONSOLE_NEWS_CHANNEL)
    redis.rpush(keys.LOG_OUTBOX, exchange("SMb1", "hi"), *[
        exchange(f"SMb-{n}", "hi").replace(PERSON, person) for n, person in enumerate(others)],
        outcome_record("SMb0-0", "queued", sid="SMout2"))
    drain(redis, get_engine(settings))  # type: ignore[arg-type]
    raw = notices(pubsub)
    pubsub.close()
    assert 1 == len(raw), raw
    assert "changes" in json.loads(raw[0])
    assert {(1, PERSON), (1, others[0]), (1, others[1]), (None, None)} == set(news.read(raw[0]))


def test_the_log_drain_announces_the_recipients_of_an_engines_push(redis: redis_lib.Redis, settings: object) -> None:
    """Replies an engine pushed through its callback show on the pages of their conversations as soon
    as the log holds them, not at their send's outcome (a paced or scheduled push may wait long)."""
    from shared import messagelog
    from shared.conversations import new_reply
    from shared.db import get_engine
    from worker.logdrain import drain

    people = ["+15551230201", "+15551230202"]
    replies = [new_reply(keys.conversation_id(1, person), person, "news") for person in people]
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CONSOLE_NEWS_CHANNEL)
    redis.rpush(keys.LOG_OUTBOX, messagelog.replies_record(replies, "+15005550006"))
    drain(redis, get_engine(settings))  # type: ignore[arg-type]
    raw = notices(pubsub)
    pubsub.close()
    assert [{(1, people[0]), (1, people[1])}] == [set(news.read(notice)) for notice in raw]


@pytest.mark.parametrize("raw", ['{"bot": 1, "person": "+15551230000"}', '{"changes": [[1, "+15551230000"]]}'])
def test_a_notice_of_either_shape_names_its_conversation(raw: str) -> None:
    assert [(1, "+15551230000")] == news.read(raw)


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '{"changes": "all"}', '{"changes": [[1]]}'])
def test_a_notice_of_an_unknown_shape_reads_as_some_conversation(raw: str) -> None:
    """A release to come may publish another shape: the page refreshes what it shows instead of failing."""
    assert [(None, None)] == news.read(raw)


def test_the_live_stream_passes_on_each_change_of_a_notice_that_the_operator_may_see(
        app: object, settings: object, bot: Bot, redis: redis_lib.Redis) -> None:
    """An operator of bot 1 hears of bot 1's conversations and of "some conversation" in a notice of
    several, never of another tenant's bot's."""
    from tests.test_console import add_operator, sign_in

    client = app.test_client()  # type: ignore[attr-defined]
    add_operator(settings, "ana@example.com", "operator", [bot.id])  # type: ignore[arg-type]
    assert 302 == sign_in(client, "ana@example.com").status_code
    response = client.get("/console/live", buffered=False)
    assert 200 == response.status_code
    chunks = iter(response.response)
    assert b"retry:" in next(chunks)  # subscribed
    news.publish_all(redis, [(bot.id, "+15551230001"), (bot.id + 1000, "+15551230002"), (None, None)])
    events: list[str] = []
    deadline = time.monotonic() + 10
    while len(events) < 2 and time.monotonic() < deadline:
        chunk = next(chunks).decode()
        if chunk.startswith("event: change"):
            events.append(chunk.split("data: ", 1)[1].strip())
    response.close()
    assert [f'{{"bot": {bot.id}, "person": "+15551230001"}}', '{"bot": null, "person": null}'] == events


def test_a_single_change_is_sent_in_the_shape_the_previous_release_reads(redis: redis_lib.Redis) -> None:
    """During a deploy the previous release's pages read only {"bot", "person"}: one change keeps that shape."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CONSOLE_NEWS_CHANNEL)
    news.publish_all(redis, {(1, "+15551230000")})
    raw = notices(pubsub)
    pubsub.close()
    assert [{"bot": 1, "person": "+15551230000"}] == [json.loads(r) for r in raw]


def test_a_batch_naming_no_conversation_publishes_nothing(redis: redis_lib.Redis, settings: object) -> None:
    """A drained batch that names no conversation (here: its one push was erased on request since)
    costs no PUBLISH (a marker notice ends the wait)."""
    from shared import messagelog
    from shared.db import get_engine
    from tests.test_logdrain import BOT_NUMBER, PERSON
    from worker.logdrain import drain

    redis.set(keys.erased(keys.conversation_id(1, PERSON)), repr(time.time()))
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CONSOLE_NEWS_CHANNEL)
    redis.rpush(keys.LOG_OUTBOX, messagelog.replies_record([{
        "id": "R-pushed-1", "bot_id": 1, "to": PERSON, "text": "hi", "media_url": None, "in_reply_to": None,
        "created_at": 1.0}], BOT_NUMBER))
    drain(redis, get_engine(settings))  # type: ignore[arg-type]
    news.publish(redis, 2, "marker")
    raw = notices(pubsub)
    pubsub.close()
    assert [{"bot": 2, "person": "marker"}] == [json.loads(r) for r in raw]


def test_publishing_never_raises_when_redis_is_unreachable() -> None:
    down = redis_lib.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    news.publish_all(down, [(1, "+15551230000"), (2, "+15551230001")])
    news.publish_all(down, [(1, "+15551230000")])


@pytest.mark.parametrize("raw", ['{"changes": null}', '{"changes": 5}', '{"changes": {}}', '{"changes": ""}'])
def test_a_changes_field_that_is_not_a_list_reads_as_some_conversation(raw: str) -> None:
    assert [(None, None)] == news.read(raw)
