"""The message log lives in the database: it survives Redis, pages both ways, merges Twilio's
callbacks whenever they come, and is written in one transaction per handled message."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import dramatiq
import pytest
import redis as redis_lib
from flask.testing import FlaskClient
from sqlalchemy import Engine, event, func, select

from cli.twilio_standin import TwilioStandin
from shared import db, keys, messagelog, optout
from shared.bots import Bot, BotStore
from shared.conversations import INBOUND, accept_inbound, replies_from
from shared.schema import conversations, messages
from tests.support.messagelog import log_written
from tests.support.fake_engine import FakeEngine

PERSON, OTHER = "+15551230001", "+15551230002"
API = "/app:mammut-1/graph/user"


@pytest.fixture
def sql(database: str) -> Iterator[Engine]:
    """The test database, as the web process reaches it."""
    engine = db.make_engine(database, size=2)
    yield engine
    engine.dispose()


@pytest.fixture
def engine_bot(bot: Bot, store: BotStore, engine: FakeEngine) -> Bot:
    return store.update(bot.id, {"engine-url": engine.url})


def inbound(bot: Bot, body: str, person: str = PERSON, at: float | None = None) -> dict[str, Any]:
    return INBOUND.load({"sid": f"SM{uuid.uuid4().hex}", "bot_id": bot.id, "sender": person, "to": bot.number,
                         "body": body, "received_at": time.time() if at is None else at})


def exchange(sql: Engine, bot: Bot, body: str, *answers: str, person: str = PERSON,
             at: float | None = None) -> dict[str, Any]:
    """An inbound message and its replies in the log, as the worker writes them."""
    message = inbound(bot, body, person, at)
    conversation = keys.conversation_id(bot.id, person)
    replies = [reply for text in answers for reply in replies_from(conversation, person, text,
                                                                   in_reply_to=message["sid"])]
    for n, reply in enumerate(replies):
        reply["id"], reply["created_at"] = f"{message['sid']}-{n}", message["received_at"] + 0.1
    with db.transaction(sql) as connection:
        messagelog.record_exchange(connection, message, replies, bot.number)
    return message


def get_log(client: FlaskClient, headers: dict[str, str], bot: Bot, person: str = PERSON,
            query: str = "") -> Any:
    return client.get(f"{API}:{bot.id}/messages?with={quote(person)}{query}", headers=headers)


def commits_while(sql: Engine, action: Callable[[], object]) -> int:
    """How many transactions commit on `sql` while `action` runs."""
    commits: list[object] = []

    def count(connection: object) -> None:
        commits.append(connection)

    event.listen(sql, "commit", count)
    try:
        action()
    finally:
        event.remove(sql, "commit", count)
    return len(commits)


def rows(sql: Engine) -> list[tuple[str, str, str]]:
    with sql.connect() as connection:
        found = connection.execute(select(messages.c.id, messages.c.text, messages.c.status).order_by(messages.c.at))
        return [tuple(row) for row in found]


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


class TestDurability:
    """What was said and sent is in the database, not in Redis."""

    def test_the_log_survives_a_redis_flush(self, client: FlaskClient, admin_headers: dict[str, str],
                                            redis: redis_lib.Redis, bot: Bot, twilio: TwilioStandin,
                                            worker: dramatiq.Worker) -> None:
        """Three messages answered by the real worker, then FLUSHALL: the log through the API is complete."""
        # Given three messages, each answered and sent by the echo engine before the next
        texts = ["uno", "dos", "tres"]
        for n, text in enumerate(texts, start=1):
            assert accept_inbound(redis, inbound(bot, text))
            sent = twilio.wait_for(n)
        conversation = keys.conversation_id(bot.id, PERSON)
        wait_until(lambda: redis.llen(keys.outbox(conversation)) == 0 and not redis.zscore(keys.PENDING, conversation))
        # (the log's records reach the database within a moment: those still in Redis are work in flight)
        wait_until(lambda: redis.llen(keys.LOG_OUTBOX) == 0)

        # When Redis loses everything
        redis.flushdb()  # FLUSHALL, kept to this test Redis database (other runs may share the server)

        # Then the log still holds each message and its reply, with Twilio's SID
        log = get_log(client, admin_headers, bot).get_json()["data"]["messages"]
        expected = [item for text in texts for item in (("in", text, "received"), ("out", f"echo: {text}", "queued"))]
        assert expected == [(e["direction"], e["text"], e["status"]) for e in log]
        assert [m.sid for m in sent] == [e["sid"] for e in log if e["direction"] == "out"]
        assert {"engine"} == {e["origin"] for e in log if e["direction"] == "out"}


class TestPaging:
    """The log and the conversation list come a page at a time, in either order, with a cursor."""

    @pytest.fixture
    def six(self, sql: Engine, bot: Bot) -> list[str]:
        """Three exchanges (six messages) a second apart; their texts, oldest first."""
        start = time.time() - 60
        for n in range(3):
            exchange(sql, bot, f"q{n}", f"a{n}", at=start + n)
        return ["q0", "a0", "q1", "a1", "q2", "a2"]

    @pytest.mark.parametrize("order", ["oldest", "newest"])
    def test_pages_follow_each_other_in_either_order(self, client: FlaskClient, admin_headers: dict[str, str],
                                                     bot: Bot, six: list[str], order: str) -> None:
        """limit=4 then the cursor: every message once, in the order asked, and no `next` after the last."""
        first = get_log(client, admin_headers, bot, query=f"&limit=4&order={order}").get_json()["data"]
        second = get_log(client, admin_headers, bot,
                         query=f"&limit=4&order={order}&after={first['next']}").get_json()["data"]
        expected = six if order == "oldest" else six[::-1]
        assert (expected[:4], expected[4:], None) == (
            [e["text"] for e in first["messages"]], [e["text"] for e in second["messages"]], second["next"])

    def test_oldest_first_by_default_and_100_at_most_by_default(self, client: FlaskClient,
                                                                admin_headers: dict[str, str], bot: Bot,
                                                                six: list[str]) -> None:
        """Without paging parameters the log reads as before: oldest first, all of a short conversation."""
        data = get_log(client, admin_headers, bot).get_json()["data"]
        assert (six, None) == ([e["text"] for e in data["messages"]], data["next"])

    @pytest.mark.parametrize("query,field", [("&limit=0", "limit"), ("&limit=1001", "limit"), ("&limit=x", "limit"),
                                             ("&order=sideways", "order"), ("&after=not-a-cursor", "after")])
    def test_bad_paging_values_are_400(self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot,
                                       query: str, field: str) -> None:
        """A limit outside 1-1000, an unknown order or a made-up cursor: 400 naming the parameter."""
        response = get_log(client, admin_headers, bot, query=query)
        assert (400, [field]) == (response.status_code, list(response.get_json()["errors"]))


class TestDeliveries:
    """Twilio's callbacks and the worker's own write meet in the log, in whatever order they come."""

    def test_a_callback_that_overtakes_the_workers_write_is_kept(self, client: FlaskClient,
                                                                 admin_headers: dict[str, str], sql: Engine,
                                                                 bot: Bot) -> None:
        """'delivered' recorded before the worker wrote the SID: the reply reads delivered, with every time."""
        message = exchange(sql, bot, "hola", "buenas")
        reply_id, sid = f"{message['sid']}-0", f"SM{uuid.uuid4().hex}"
        with db.transaction(sql) as connection:
            messagelog.record_delivery(connection, sid, bot.id, "delivered", error_code=None)
        with db.transaction(sql) as connection:
            messagelog.record_sent(connection, reply_id, sid, "queued")
        [reply] = [e for e in get_log(client, admin_headers, bot).get_json()["data"]["messages"] if e["id"] == reply_id]
        assert (sid, "delivered") == (reply["sid"], reply["status"])
        assert {"pending", "queued", "delivered"} == set(reply["statuses"])

    def test_a_failed_delivery_shows_its_error_code(self, client: FlaskClient, admin_headers: dict[str, str],
                                                    sql: Engine, bot: Bot) -> None:
        """queued, then undelivered with 30003, then a late 'sent': undelivered and 30003 stand."""
        message = exchange(sql, bot, "hola", "buenas")
        reply_id, sid = f"{message['sid']}-0", f"SM{uuid.uuid4().hex}"
        with db.transaction(sql) as connection:
            messagelog.record_sent(connection, reply_id, sid, "queued")
            messagelog.record_delivery(connection, sid, bot.id, "undelivered", error_code=30003)
            messagelog.record_delivery(connection, sid, bot.id, "sent")
        [reply] = [e for e in get_log(client, admin_headers, bot).get_json()["data"]["messages"] if e["id"] == reply_id]
        assert ("undelivered", 30003) == (reply["status"], reply["error-code"])


class TestWrites:
    """The worker writes an inbound and its replies in one transaction, once, whatever happens."""

    def test_an_engines_callback_replies_reach_the_log_with_their_queuing_step(
            self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot, store: BotStore,
            redis: redis_lib.Redis, sql: Engine) -> None:
        """Replies posted to the callback route join the log outbox in the step that queues them, as 'callback'."""
        bot = store.update(bot.id, {"allow-cold-push": True})  # a first message: not what this is about
        response = client.post(f"/channels/sms/callback/{bot.id}", headers=admin_headers,
                               json=[{"recipient_id": PERSON, "text": "uno"}, {"recipient_id": PERSON, "text": "dos"}])
        assert 202 == response.status_code
        log_written(redis, sql)
        log = get_log(client, admin_headers, bot).get_json()["data"]["messages"]
        assert [("uno", "callback", "pending"), ("dos", "callback", "pending")] == [
            (e["text"], e["origin"], e["status"]) for e in log]

    def test_an_answered_message_reaches_the_log_in_the_step_that_queues_its_replies(
            self, redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine, sql: Engine, broker: dramatiq.Broker,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """The exchange's record joins the log outbox with the replies (one Redis step), then one commit writes it."""
        from worker import conversation as handler

        # Given an engine answering twice, and the send left out
        engine.answer = lambda payload: [{"recipient_id": payload["sender"], "text": t} for t in ("one", "two")]
        monkeypatch.setattr(handler, "deliver_now", lambda *_: None)
        monkeypatch.setattr(handler, "deliver_taken", lambda *_, **__: None)
        message = inbound(engine_bot, "hola")
        assert accept_inbound(redis, message)

        # When the worker handles it
        handler.drain(redis, keys.conversation_id(engine_bot.id, PERSON))

        # Then one record waits beside the two queued replies, and one commit writes all three rows
        assert (1, 2) == (redis.llen(keys.LOG_OUTBOX),
                          redis.llen(keys.outbox(keys.conversation_id(engine_bot.id, PERSON))))
        assert 1 == commits_while(sql, lambda: log_written(redis, sql))
        expected = [(message["sid"], "hola", "received"), (f"{message['sid']}-0", "one", "pending"),
                    (f"{message['sid']}-1", "two", "pending")]
        assert expected == rows(sql)
        with sql.connect() as connection:
            assert f"{message['sid']}-1" == connection.scalar(select(conversations.c.last_message_id))

    def test_many_messages_share_one_commit(self, redis: redis_lib.Redis, engine_bot: Bot, engine: FakeEngine,
                                            sql: Engine, broker: dramatiq.Broker,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """Twenty people's answered messages are written to the database in one transaction, not twenty."""
        from worker import conversation as handler

        monkeypatch.setattr(handler, "deliver_now", lambda *_: None)
        monkeypatch.setattr(handler, "deliver_taken", lambda *_, **__: None)
        people = [f"+1555777{n:04d}" for n in range(20)]
        for person in people:
            assert accept_inbound(redis, inbound(engine_bot, "hola", person=person))
            handler.drain(redis, keys.conversation_id(engine_bot.id, person))

        assert 1 == commits_while(sql, lambda: log_written(redis, sql))
        assert 40 == len(rows(sql))

    def test_a_message_handled_again_leaves_no_duplicate_or_orphan(self, redis: redis_lib.Redis, engine_bot: Bot,
                                                                   engine: FakeEngine, sql: Engine,
                                                                   broker: dramatiq.Broker,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        """A worker that died before queuing three replies logged nothing; the retry's two replies are the log's."""
        from worker import conversation as handler

        monkeypatch.setattr(handler, "deliver_now", lambda *_: None)
        monkeypatch.setattr(handler, "deliver_taken", lambda *_, **__: None)
        conversation = keys.conversation_id(engine_bot.id, PERSON)
        message = inbound(engine_bot, "hola")
        assert accept_inbound(redis, message)

        # Given a first attempt that died before queuing its three replies
        engine.answer = lambda payload: [{"recipient_id": payload["sender"], "text": t} for t in ("a", "b", "c")]

        def die(*_: Any, **__: Any) -> None:
            raise SystemExit("killed")

        with monkeypatch.context() as crash:
            crash.setattr(handler, "queue_and_take", die)
            with pytest.raises(SystemExit):
                handler.drain(redis, conversation)
        assert (1, 0) == (redis.llen(keys.processing(conversation)), redis.llen(keys.LOG_OUTBOX))

        # When another worker handles it again, and the engine answers differently
        engine.answer = lambda payload: [{"recipient_id": payload["sender"], "text": t} for t in ("x", "y")]
        redis.delete(keys.conversation_lock(conversation))
        handler.drain(redis, conversation)
        log_written(redis, sql)

        # Then the log holds the message once and the second answer's replies only
        expected = [(message["sid"], "hola", "received"), (f"{message['sid']}-0", "x", "pending"),
                    (f"{message['sid']}-1", "y", "pending")]
        assert expected == rows(sql)
        assert [f"{message['sid']}-0", f"{message['sid']}-1"] == redis.lrange(keys.outbox(conversation), 0, -1)

    def test_an_engine_error_leaves_no_row_behind(self, redis: redis_lib.Redis, engine_bot: Bot, sql: Engine,
                                                  broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch) -> None:
        """The log is written after the engine answered: a failure before that writes nothing."""
        from worker import conversation as handler

        def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("engine exploded")

        monkeypatch.setattr(handler, "engine_for", broken)
        assert accept_inbound(redis, inbound(engine_bot, "hola"))
        with pytest.raises(RuntimeError):
            handler.drain(redis, keys.conversation_id(engine_bot.id, PERSON))
        with sql.connect() as connection:
            assert 0 == connection.scalar(select(func.count()).select_from(messages))


class TestConversations:
    """GET .../conversations lists the people a bot talked to, most recent first, with their opt-out state."""

    def test_most_recent_first_with_opt_out_state_a_page_at_a_time(self, client: FlaskClient,
                                                                   admin_headers: dict[str, str], sql: Engine,
                                                                   bot: Bot) -> None:
        """Two people, the opted-out one earlier: the later first; limit=1 pages through both."""
        exchange(sql, bot, "STOP", person=OTHER, at=time.time() - 30)
        exchange(sql, bot, "hola", "buenas", person=PERSON)
        with db.transaction(sql) as connection:
            optout.record(connection, bot.number, OTHER, True, "keyword STOP")

        whole = client.get(f"{API}:{bot.id}/conversations", headers=admin_headers).get_json()["data"]
        first = client.get(f"{API}:{bot.id}/conversations?limit=1", headers=admin_headers).get_json()["data"]
        second = client.get(f"{API}:{bot.id}/conversations?limit=1&after={first['next']}",
                            headers=admin_headers).get_json()["data"]

        expected = [(PERSON, "buenas", False), (OTHER, "STOP", True)]
        assert expected == [(c["person"], c["last-message"]["text"], c["opted-out"]) for c in whole["conversations"]]
        assert expected == [(c["person"], c["last-message"]["text"], c["opted-out"])
                            for c in first["conversations"] + second["conversations"]]
        assert (None, None) == (whole["next"], second["next"])

    def test_an_unknown_bot_is_404(self, client: FlaskClient, admin_headers: dict[str, str], bot: Bot) -> None:
        """No bot with that id: 404."""
        assert 404 == client.get(f"{API}:{bot.id + 1}/conversations", headers=admin_headers).status_code
