"""The inbound webhook: acknowledged at once with empty TwiML, queued once, in order, with every field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from urllib.parse import urlencode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis as redis_lib
import requests
import structlog
from fakeredis import TcpFakeServer
from flask.testing import FlaskClient

from cli.twilio_standin import TwilioStandin
from shared import db, keys, metrics
from shared.bots import Bot, BotStore
from shared.conversations import INBOUND, accept_inbound, last_wrote
from shared.crypto import Vault
from shared.optout import is_opted_out
from shared.redis import connect
from shared.settings import Settings
from shared.tasks import CONVERSATIONS_QUEUE, HANDLE_CONVERSATION, OUTBOUND_QUEUE
from tests.conftest import (
    ADMIN_TOKEN, BOT_ACCOUNT_SID, BOT_AUTH_TOKEN, BOT_NUMBER, CREDENTIALS_KEY, free_port, queued_kicks,
)
from tests.test_signature import INBOUND_PATH, inbound_params, post_signed, sign
from webhook import create_app
from webhook.twilio_auth import EMPTY_TWIML

SENDER = "+15551230001"
CONVERSATION = f"1:{SENDER}"  # the test bot is the registry's first bot


def inbox(redis: redis_lib.Redis, sender: str = SENDER, bot_id: int = 1) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in redis.lrange(keys.inbox(keys.conversation_id(bot_id, sender)), 0, -1)]


def raw_client(redis_url: str) -> redis_lib.Redis:
    """A client of the tests' Redis answering bytes: the marks' values are binary."""
    return redis_lib.Redis.from_url(redis_url)


def counter(redis: redis_lib.Redis, name: str, **labels: object) -> int:
    """A counter as Redis holds it once this process's tally is written (a web worker writes its own
    every second, and /metrics first)."""
    metrics.TALLY.flush(redis)
    return int(redis.hget(keys.METRIC_COUNTERS, metrics.field(name, **labels)) or 0)


class TestAcknowledgement:
    """A signed message is acknowledged with exactly Twilio's empty TwiML and queued with every field."""

    def test_signed_message_gets_exactly_the_empty_twiml(self, client: FlaskClient, bot: Bot) -> None:
        """200, text/xml, and the document twilio's MessagingResponse renders."""
        response = post_signed(client, inbound_params())
        assert (200, "text/xml", '<?xml version="1.0" encoding="UTF-8"?><Response />') == (
            response.status_code, response.mimetype, response.get_data(as_text=True))
        assert EMPTY_TWIML == response.get_data(as_text=True)

    def test_message_is_on_the_conversation_inbox_with_every_field(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """Body, media with content types, segments, location and OptOutType all reach the worker."""
        # Given an MMS with two images, three segments and location fields
        params = inbound_params(
            Body="¿Cómo estás?", NumMedia="2", NumSegments="3",
            MediaUrl0="https://api.twilio.com/m/ME0", MediaContentType0="image/jpeg",
            MediaUrl1="https://api.twilio.com/m/ME1", MediaContentType1="image/png",
            FromCity="MADRID", FromCountry="ES", ToState="CA", ToZip="94105", OptOutType="HELP",
        )
        # When Twilio posts it
        assert 200 == post_signed(client, params).status_code
        # Then the worker finds all of it on the conversation's inbox, in the shape INBOUND loads unchanged
        [message] = inbox(redis)
        assert message == INBOUND.load(message)
        received_at = message.pop("received_at")
        assert {
            "sid": params["MessageSid"], "bot_id": bot.id, "sender": SENDER, "to": BOT_NUMBER,
            "body": "¿Cómo estás?",
            "media": [{"url": "https://api.twilio.com/m/ME0", "content_type": "image/jpeg"},
                      {"url": "https://api.twilio.com/m/ME1", "content_type": "image/png"}],
            "num_segments": 3,
            "location": {"FromCity": "MADRID", "FromCountry": "ES", "ToState": "CA", "ToZip": "94105"},
            "opt_out_type": "HELP", "event": "message",
        } == message
        assert isinstance(received_at, float)

    def test_a_handle_conversation_task_is_enqueued(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """A worker is asked, through dramatiq's Redis queue, to drain this conversation."""
        params = inbound_params()
        post_signed(client, params)
        [kick] = queued_kicks(redis)
        wake_id = f"wake-{params['MessageSid']}"
        assert {
            "queue_name": CONVERSATIONS_QUEUE, "actor_name": HANDLE_CONVERSATION, "args": (CONVERSATION,), "kwargs": {},
            "options": {}, "message_id": wake_id,
        } == {name: value for name, value in kick.asdict().items() if name != "message_timestamp"}
        assert abs(kick.message_timestamp / 1000 - time.time()) < 60

    def test_path_without_trailing_slash_is_served_not_redirected(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """/channels/sms answers itself: a redirect would break Twilio's signature."""
        response = post_signed(client, inbound_params(), path="/channels/sms")
        assert (200, EMPTY_TWIML, 1) == (response.status_code, response.get_data(as_text=True), len(inbox(redis)))

    def test_received_is_logged_without_the_token_or_the_full_number(
            self, settings: Settings, bot: Bot, capsys: pytest.CaptureFixture[str]) -> None:
        """The inbound.received line the app writes (default settings) names the message and bot, the
        sender by its last four digits only, and no auth token."""
        # Given the app logging as configured, LOG_PHONE_NUMBERS left at its default
        client = create_app(settings).test_client()
        try:
            # When a message arrives
            params = inbound_params()
            post_signed(client, params)
            written = capsys.readouterr().err
        finally:
            structlog.reset_defaults()  # the configured stream is capsys's, closed after this test
        # Then its line is there, with the number masked, and nothing written holds a secret or the number
        [line] = [line for line in written.splitlines() if "inbound.received" in line]
        assert params["MessageSid"] in line and f"bot_id={bot.id}" in line and f"from_=********{SENDER[-4:]}" in line
        assert SENDER[2:] not in written and BOT_AUTH_TOKEN not in written


class TestDuplicates:
    """Twilio's retries are acknowledged again and queued once."""

    def test_same_message_sid_twice_is_acknowledged_and_queued_once(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis, logs: list[dict[str, Any]]) -> None:
        """A retry with the same MessageSid: 200 both times, one inbox entry, counted as a duplicate."""
        params = inbound_params()
        first, again = post_signed(client, params), post_signed(client, params)
        assert (200, 200) == (first.status_code, again.status_code)
        assert EMPTY_TWIML == again.get_data(as_text=True)
        assert [params["MessageSid"]] == [m["sid"] for m in inbox(redis)]
        assert 1 == counter(redis, "sms_inbound", result="duplicate")
        assert ["inbound.received", "inbound.duplicate"] == [e["event"] for e in logs if e["event"].startswith("inbound.")]

    def test_same_idempotency_token_is_queued_once(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """Two requests carrying one I-Twilio-Idempotency-Token are one message, whatever else differs."""
        token = {"I-Twilio-Idempotency-Token": "retry-token-1"}
        first = post_signed(client, inbound_params(Body="uno"), headers=token)
        again = post_signed(client, inbound_params(Body="uno"), headers=token)
        assert (200, 200, ["uno"]) == (first.status_code, again.status_code, [m["body"] for m in inbox(redis)])

    def test_a_duplicate_wakes_no_worker(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """A retry arriving once a worker took the message (the inbox empty again) is not queued and wakes nobody."""
        # Given a message a worker has woken for and taken off the inbox
        params = inbound_params()
        post_signed(client, params)
        assert [CONVERSATION] == [m.args[0] for m in queued_kicks(redis)]
        redis.lmove(keys.inbox(CONVERSATION), keys.processing(CONVERSATION))
        redis.delete(keys.WAKE_UPS)  # the wake-up, consumed
        # When Twilio retries it
        assert 200 == post_signed(client, params).status_code
        # Then the inbox stays empty and no worker is woken
        assert ([], []) == (inbox(redis), queued_kicks(redis))

    def test_a_message_is_remembered_for_48_hours(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis, redis_url: str) -> None:
        """The conversation's mark holds the time of the text and the digests of its MessageSid and its
        idempotency token, in a hash that outlives its last hour by 48 hours."""
        params = inbound_params()
        before = int(time.time())
        post_signed(client, params, headers={"I-Twilio-Idempotency-Token": "retry-token-2"})
        hour = int(time.time() // 3600)
        marks = keys.marks(hour)
        value = raw_client(redis_url).hget(marks, keys.mark_field(CONVERSATION))
        assert value is not None
        digests = [keys.mark_digest(bot.account_sid, name) for name in (params["MessageSid"], "retry-token-2")]
        last_hour = hour - hour % keys.SEEN_BUCKET_HOURS + keys.SEEN_BUCKET_HOURS - 1
        # (the slot between: no older bucket holds a field of the conversation)
        slot = keys.MARK_SLOT.encode() + b"\x00"
        assert (slot, b"".join(digests), (last_hour + 1 + 48) * 3600) == (value[4:12], value[12:],
                                                                          redis.expiretime(marks))
        assert before <= int.from_bytes(value[:4], "big") <= time.time()

    @pytest.mark.parametrize(("hours_later", "duplicate"), [(0.0, True), (47.0, True), (47.99, True), (49.0, False)])
    def test_a_retry_is_recognised_within_48_hours_and_not_after_49(
            self, redis: redis_lib.Redis, bot: Bot, hours_later: float, duplicate: bool) -> None:
        """A retry of a message accepted `hours_later` before is a duplicate within 48 hours, a new message after 49."""
        # Given a message accepted now, marked under its MessageSid and its idempotency token
        now = time.time()
        first = INBOUND.load({"sid": "SMretry47", "bot_id": bot.id, "sender": SENDER, "to": bot.number, "body": "hola",
                              "received_at": now})
        assert accept_inbound(redis, first, "token-47", account_sid=bot.account_sid)
        # When Twilio retries it that many hours later (by the clock the webhook stamps it with)
        retry = {**first, "received_at": now + hours_later * 3600}
        by_sid = accept_inbound(redis, retry, account_sid=bot.account_sid)
        by_token = accept_inbound(redis, {**retry, "sid": "SMother47"}, "token-47", account_sid=bot.account_sid)
        # Then it is queued again only once the marks are older than the look
        assert [not duplicate, not duplicate] == [by_sid, by_token]

    def test_a_mark_of_the_earlier_shape_is_still_a_duplicate(self, redis: redis_lib.Redis, bot: Bot) -> None:
        """A mark the previous release (or `migrate --from-redis`) wrote as a key of its own still stops a retry."""
        # Given the marks of a message the previous release accepted, under its MessageSid and its token
        redis.set(keys.seen(bot.account_sid, "SMbefore28"), "1", ex=3600)
        redis.set(keys.seen(bot.account_sid, "token-before-28"), "1", ex=3600)
        message = INBOUND.load({"sid": "SMbefore28", "bot_id": bot.id, "sender": SENDER, "to": bot.number,
                                "body": "hola", "received_at": time.time()})
        # When Twilio retries it after the upgrade, by either
        by_sid = accept_inbound(redis, message, account_sid=bot.account_sid)
        by_token = accept_inbound(redis, {**message, "sid": "SMafter28"}, "token-before-28", account_sid=bot.account_sid)
        # Then neither is queued again
        assert ([False, False], []) == ([by_sid, by_token], inbox(redis))

    def test_a_retry_47_hours_later_is_found_in_the_conversations_mark(self, redis: redis_lib.Redis, bot: Bot) -> None:
        """Issue 28's layout alone (no mark of an earlier shape written) still knows a retry 47 hours on."""
        # Given a message accepted now, whose only marks are its conversation's field of a hash per 6 hours
        now = time.time()
        first = INBOUND.load({"sid": "SMlayout47", "bot_id": bot.id, "sender": SENDER, "to": bot.number,
                              "body": "hola", "received_at": now})
        assert accept_inbound(redis, first, "token-layout-47", account_sid=bot.account_sid)
        assert ([], [keys.marks(int(now // 3600))]) == (redis.keys("sms:seen:*"), redis.keys("sms:marks:*"))
        # When Twilio retries it 47 hours later, by MessageSid or by idempotency token
        retry = {**first, "received_at": now + 47 * 3600}
        by_sid = accept_inbound(redis, retry, account_sid=bot.account_sid)
        by_token = accept_inbound(redis, {**retry, "sid": "SMother-layout"}, "token-layout-47", account_sid=bot.account_sid)
        # Then neither is queued again
        assert ([False, False], 1) == ([by_sid, by_token], len(inbox(redis)))

    def test_a_mark_of_the_previous_releases_6_hour_hashes_is_still_a_duplicate(
            self, redis: redis_lib.Redis, bot: Bot) -> None:
        """A mark the previous release made as a field of its 6-hour hashes (keys.seen_hours) stops a retry."""
        # Given the marks of a message the previous release accepted 40 hours ago, under its MessageSid and token
        now = time.time()
        made = int(now // 3600) - 40
        for name in ("SMin6hours", "token-in-6-hours"):
            redis.hset(keys.seen_hours(made), keys.seen_field(bot.account_sid, name), str(made))
        redis.expire(keys.seen_hours(made), 3600)
        message = INBOUND.load({"sid": "SMin6hours", "bot_id": bot.id, "sender": SENDER, "to": bot.number,
                                "body": "hola", "received_at": now})
        # When Twilio retries it after the upgrade, by either
        by_sid = accept_inbound(redis, message, account_sid=bot.account_sid)
        by_token = accept_inbound(redis, {**message, "sid": "SMafter-6h"}, "token-in-6-hours", account_sid=bot.account_sid)
        # Then neither is queued again
        assert ([False, False], []) == ([by_sid, by_token], inbox(redis))

    def test_a_second_text_in_the_same_bucket_is_not_a_duplicate_of_the_first(
            self, redis: redis_lib.Redis, bot: Bot) -> None:
        """The conversation's mark gains the second text's digests and keeps the first's: both are
        queued once, and a retry of either is a duplicate."""
        now = time.time()
        texts = [INBOUND.load({"sid": f"SMsame-bucket-{n}", "bot_id": bot.id, "sender": SENDER, "to": bot.number,
                               "body": f"n{n}", "received_at": now + n}) for n in (1, 2)]
        accepted = [accept_inbound(redis, text, f"token-same-bucket-{n}", account_sid=bot.account_sid)
                    for n, text in zip((1, 2), texts)]
        retried = [accept_inbound(redis, text, account_sid=bot.account_sid) for text in texts]
        by_token = [accept_inbound(redis, {**text, "sid": f"SMretry-{n}"}, f"token-same-bucket-{n}",
                                   account_sid=bot.account_sid) for n, text in zip((1, 2), texts)]
        assert ([True, True], [False, False], [False, False], ["n1", "n2"]) == (
            accepted, retried, by_token, [m["body"] for m in inbox(redis)])

    def test_two_peoples_marks_in_one_bucket_are_never_taken_for_each_other(
            self, redis: redis_lib.Redis, bot: Bot) -> None:
        """Each conversation's field holds its own time and digests: one person's retry is found, the other's
        new text with an unrelated SID is not, and each is known to have written when they did."""
        other = "+15551230002"
        now = time.time()
        mine = INBOUND.load({"sid": "SMmine", "bot_id": bot.id, "sender": SENDER, "to": bot.number, "body": "a",
                             "received_at": now - 120})
        theirs = INBOUND.load({"sid": "SMtheirs", "bot_id": bot.id, "sender": other, "to": bot.number, "body": "b",
                               "received_at": now - 60})
        assert accept_inbound(redis, mine, account_sid=bot.account_sid)
        assert accept_inbound(redis, theirs, account_sid=bot.account_sid)
        assert not accept_inbound(redis, theirs, account_sid=bot.account_sid)
        assert accept_inbound(redis, {**mine, "sid": "SMmine-2", "received_at": now - 90}, account_sid=bot.account_sid)
        assert [int(now - 90), int(now - 60), 0] == last_wrote(redis, bot.id, [SENDER, other, "+15551230003"], now)

    def test_accepted_texts_leave_only_the_bucket_hashes_behind(self, redis: redis_lib.Redis, bot: Bot) -> None:
        """Once the worker took the texts, what stays of 20 people's texts is one hash of marks: no key per person."""
        now = time.time()
        for n in range(20):
            assert accept_inbound(redis, INBOUND.load({
                "sid": f"SMmemory{n}", "bot_id": bot.id, "sender": f"+1555999{n:04d}", "to": bot.number,
                "body": "hola", "received_at": now}), account_sid=bot.account_sid)
        for n in range(20):  # what a worker does with them
            redis.delete(keys.inbox(keys.conversation_id(bot.id, f"+1555999{n:04d}")))
        redis.delete(keys.PENDING, keys.WAKE_UPS, keys.METRIC_COUNTERS, keys.LEGACY_MARKS_UNTIL)
        left = [key for key in redis.keys("sms:*") if key != keys.REGISTRY and not key.startswith("sms:opted-out:")
                and not key.startswith("sms:handoffs:")]
        assert ([keys.marks(int(now // 3600))], 20) == (left, redis.hlen(keys.marks(int(now // 3600))))

    @pytest.mark.parametrize("same", ["MessageSid", "I-Twilio-Idempotency-Token"])
    def test_a_retried_webhook_is_answered_once(
            self, client: FlaskClient, bot: Bot, twilio: TwilioStandin, worker: dramatiq.Worker,
            broker: dramatiq.Broker, same: str) -> None:
        """End to end: Twilio posting a message twice (same MessageSid, or same idempotency token) gets one reply."""
        # Given a worker answering with the built-in echo engine
        first = inbound_params(Body="una vez")
        again = first if same == "MessageSid" else inbound_params(Body="una vez")
        headers = {"I-Twilio-Idempotency-Token": "retry-token-3"} if same != "MessageSid" else {}
        # When the webhook is posted, answered, and posted again
        assert 200 == post_signed(client, first, headers=headers).status_code
        twilio.wait_for(1)
        assert 200 == post_signed(client, again, headers=headers).status_code
        for queue in (CONVERSATIONS_QUEUE, OUTBOUND_QUEUE):
            broker.join(queue, timeout=10_000)
        # Then exactly one reply went out
        assert 1 == len([message for message in twilio.messages if message.to == SENDER])


class TestOrder:
    """One conversation's messages are queued in the order they arrived."""

    def test_burst_of_twenty_from_one_sender_lands_in_order(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """Twenty messages in a row are on the inbox in arrival order."""
        bodies = [f"mensaje {n}" for n in range(20)]
        statuses = {post_signed(client, inbound_params(Body=body)).status_code for body in bodies}
        assert ({200}, bodies) == (statuses, [m["body"] for m in inbox(redis)])

    def test_a_burst_wakes_one_worker_not_one_per_message(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """Only a message that finds the inbox empty wakes a worker: the one draining it takes the rest."""
        for n in range(20):
            post_signed(client, inbound_params(Body=f"mensaje {n}"))
        assert [(HANDLE_CONVERSATION, (CONVERSATION,))] == [(m.actor_name, tuple(m.args)) for m in queued_kicks(redis)]

    def test_a_message_finding_the_inbox_emptied_wakes_a_worker_again(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """Once a worker has taken everything off the inbox, the next message wakes one anew."""
        # Given a message a worker has already taken off the inbox
        post_signed(client, inbound_params(Body="uno"))
        redis.lmove(keys.inbox(CONVERSATION), keys.processing(CONVERSATION))
        # When the next one arrives
        post_signed(client, inbound_params(Body="dos"))
        # Then it is queued and wakes a worker of its own
        assert (["dos"], [CONVERSATION] * 2) == (
            [m["body"] for m in inbox(redis)], [m.args[0] for m in queued_kicks(redis)])

    def test_senders_get_separate_conversations(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """Two senders' messages go to two inboxes."""
        post_signed(client, inbound_params(From="+15550000001", Body="a"))
        post_signed(client, inbound_params(From="+15550000002", Body="b"))
        assert (["a"], ["b"]) == ([m["body"] for m in inbox(redis, "+15550000001")],
                                  [m["body"] for m in inbox(redis, "+15550000002")])


class TestOptOut:
    """Opt-out keywords are recorded per bot number and queued as events."""

    @pytest.mark.parametrize("fields", [
        {"Body": "STOP"}, {"Body": "stop"}, {"Body": " Unsubscribe "}, {"Body": "please stop", "OptOutType": "STOP"},
    ], ids=["STOP", "stop", "unsubscribe", "OptOutType"])
    def test_opt_out_marks_the_sender_and_is_queued_as_an_event(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis, fields: dict[str, str]) -> None:
        """The sender is opted out for this bot number, and the engine gets an opt_out event."""
        post_signed(client, inbound_params(**fields))
        assert (True, ["opt_out"]) == (is_opted_out(redis, BOT_NUMBER, SENDER), [m["event"] for m in inbox(redis)])

    @pytest.mark.parametrize("keyword", ["STOP", "stopall", "Unsubscribe", "cancel", "\tEND ", "quit", "REVOKE",
                                         "OptOut"], ids=str.strip)
    def test_every_opt_out_keyword_is_queued_as_an_opt_out(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis, keyword: str) -> None:
        """Each opt-out keyword the README lists, as the whole body in any case, reaches the engine as opt_out."""
        post_signed(client, inbound_params(Body=keyword))
        assert ["opt_out"] == [m["event"] for m in inbox(redis)]

    @pytest.mark.parametrize("keyword", ["START", "yes", " Unstop "], ids=str.strip)
    def test_every_opt_in_keyword_is_queued_as_an_opt_in(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis, keyword: str) -> None:
        """Each opt-in keyword the README lists, after a STOP, reaches the engine as opt_in."""
        post_signed(client, inbound_params(Body="STOP"))
        post_signed(client, inbound_params(Body=keyword))
        assert ["opt_out", "opt_in"] == [m["event"] for m in inbox(redis)]

    def test_stop_inside_a_sentence_is_an_ordinary_message(
            self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """Only the whole body counts: 'no voy a parar, stop it' opts nobody out."""
        post_signed(client, inbound_params(Body="don't stop me now"))
        assert (False, ["message"]) == (is_opted_out(redis, BOT_NUMBER, SENDER), [m["event"] for m in inbox(redis)])

    @pytest.mark.parametrize("fields", [{"Body": "START"}, {"Body": "unstop"}, {"Body": "hi", "OptOutType": "START"}])
    def test_opt_in_lifts_it(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis, fields: dict[str, str]) -> None:
        """START after STOP: the sender can be reached again, and the engine gets an opt_in event."""
        post_signed(client, inbound_params(Body="STOP"))
        post_signed(client, inbound_params(**fields))
        assert (False, ["opt_out", "opt_in"]) == (
            is_opted_out(redis, BOT_NUMBER, SENDER), [m["event"] for m in inbox(redis)])

    def test_opt_out_is_per_bot_number(self, client: FlaskClient, bot: Bot, store: BotStore,
                                       redis: redis_lib.Redis) -> None:
        """STOP to one bot leaves the sender reachable by another bot."""
        other = store.create({"name": "other", "twilio-account-sid": BOT_ACCOUNT_SID,
                              "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": "+15005550009"})
        post_signed(client, inbound_params(Body="STOP"))
        assert (True, False) == (is_opted_out(redis, BOT_NUMBER, SENDER), is_opted_out(redis, other.number, SENDER))


class TestBadInput:
    """Every bad input gets its 4xx; nothing produces a 500 or a traceback."""

    @pytest.mark.parametrize("field", ["From", "To", "MessageSid"])
    def test_missing_required_field_is_400(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                           field: str) -> None:
        """Without From, To or MessageSid there is no message to queue: 400, nothing queued."""
        params = inbound_params()
        del params[field]
        response = post_signed(client, params)
        assert (400, 0) == (response.status_code, redis.llen(keys.WAKE_UPS))

    def test_unknown_number_is_404_and_logged_masked(self, client: FlaskClient, bot: Bot,
                                                     logs: list[dict[str, Any]]) -> None:
        """A To no bot owns: 404; the rejection names the number only by its last four digits."""
        response = post_signed(client, inbound_params(To="+15009998877"))
        [event] = [e for e in logs if e["event"] == "inbound.rejected"]
        assert (404, "unknown_number") == (response.status_code, event["reason"])
        # capture_logs skips the processors, so the raw field is there; production masks it on the way out
        assert "+15009998877" == event["to"]
        assert "+15009998877" not in _rendered(event)

    def test_body_over_64_kib_is_413(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis) -> None:
        """A 65 KiB form: 413 with a short plain answer, nothing queued."""
        response = post_signed(client, inbound_params(Body="x" * 65 * 1024))
        assert (413, "text/plain", 0) == (response.status_code, response.mimetype, len(inbox(redis)))

    @pytest.mark.parametrize("fields", [
        {"NumMedia": "many"}, {"NumMedia": "-3"}, {"NumMedia": "99999999"}, {"NumSegments": "x"},
        {"Body": "\x00<Response>&amp;"},
    ], ids=["NumMedia-text", "NumMedia-negative", "NumMedia-huge", "NumSegments-text", "odd-body"])
    def test_odd_but_signed_fields_are_accepted_not_500(self, client: FlaskClient, bot: Bot,
                                                       fields: dict[str, str]) -> None:
        """Malformed counts or odd bodies are the caller's business: never a 500."""
        response = post_signed(client, inbound_params(**fields))
        assert 200 == response.status_code

    def test_undecodable_body_is_not_500(self, client: FlaskClient, bot: Bot) -> None:
        """Bytes that are not UTF-8 are refused or accepted, never a 500."""
        response = client.post(INBOUND_PATH, data=b"From=%FF%FE&To=%2B15005550006&MessageSid=SM1&Body=\xff",
                               content_type="application/x-www-form-urlencoded")
        assert response.status_code in (400, 403, 404)

    def test_get_is_not_allowed(self, client: FlaskClient) -> None:
        """Only POST is served."""
        assert 405 == client.get(INBOUND_PATH).status_code


class TestRedisDown:
    """Without Redis nothing is acknowledged: 503, so Twilio retries or uses the fallback URL."""

    def test_redis_unreachable_is_503_not_500(self, settings: Settings, bot: Bot) -> None:
        """An app pointed at a closed port answers 503."""
        client = create_app(settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
        response = post_signed(client, inbound_params())
        assert (503, "text/plain") == (response.status_code, response.mimetype)

    def test_redis_lost_after_bot_was_cached_is_503(self, settings: Settings) -> None:
        """With the bot cached in-process and Redis gone, the message is not acknowledged."""
        # Given a Redis of our own, a bot on it, and one message accepted (so the bot is cached)
        with _own_redis() as url:
            store = BotStore(db.get_engine(settings), connect(url), Vault([CREDENTIALS_KEY]))
            store.create({"name": "b", "twilio-account-sid": BOT_ACCOUNT_SID, "twilio-auth-token": BOT_AUTH_TOKEN,
                          "main-phone-number": BOT_NUMBER})
            app = create_app(settings.with_overrides(redis_url=url))
            client = app.test_client()
            assert 200 == post_signed(client, inbound_params()).status_code
        # When that Redis goes away
        app.extensions["mammut"].redis.connection_pool.disconnect()
        app.extensions["mammut"].broker.client.connection_pool.disconnect()
        # Then the next message is refused with 503, not acknowledged
        assert 503 == post_signed(client, inbound_params()).status_code


class TestDatabaseOutage:
    """The webhook needs the database only when the registry's copy in Redis is gone and nothing is cached."""

    def test_a_bot_already_cached_is_answered_while_the_database_is_down(
            self, settings: Settings, bot: Bot, unreachable: db.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """Once a number's bot is cached, its messages are accepted whatever the database does."""
        app = create_app(settings)
        client = app.test_client()
        wait_for_cache_listener(app)
        assert 200 == post_signed(client, inbound_params()).status_code

        monkeypatch.setattr(app.extensions["mammut"].store, "_engine", unreachable)

        assert 200 == post_signed(client, inbound_params()).status_code

    def test_a_number_this_process_never_looked_up_is_answered_from_the_registry_copy(
            self, app: Any, bot: Bot, unreachable: db.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """A process that has never seen the bot (started during the outage) accepts its texts: the copy in Redis routes them."""
        monkeypatch.setattr(app.extensions["mammut"].store, "_engine", unreachable)

        assert 200 == post_signed(app.test_client(), inbound_params()).status_code

    def test_an_expired_entry_is_served_when_it_cannot_be_loaded_again(
            self, settings: Settings, bot: Bot, redis: Any, unreachable: db.Engine,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """Stale if error: with the copy flushed and the database down, the last bot known still answers."""
        app = create_app(settings)
        app.extensions["mammut"].bots._ttl = 0.0  # every lookup past its entry's life
        client = app.test_client()
        wait_for_cache_listener(app)
        assert 200 == post_signed(client, inbound_params()).status_code

        monkeypatch.setattr(app.extensions["mammut"].store, "_engine", unreachable)
        redis.delete(keys.REGISTRY)

        assert 200 == post_signed(client, inbound_params()).status_code

    def test_a_number_known_nowhere_is_503_while_the_database_is_down(
            self, app: Any, bot: Bot, redis: Any, unreachable: db.Engine, monkeypatch: pytest.MonkeyPatch,
            logs: list[dict[str, object]]) -> None:
        """Copy flushed, nothing cached, database down: whose number it is cannot be known, so 503
        (logged as unavailable, not as a crash)."""
        monkeypatch.setattr(app.extensions["mammut"].store, "_engine", unreachable)
        redis.delete(keys.REGISTRY)

        response = post_signed(app.test_client(), inbound_params())

        assert (503, "Service Unavailable") == (response.status_code, response.get_data(as_text=True))
        assert ["inbound.unavailable"] == [e["event"] for e in logs if e["event"].startswith(("inbound.", "twilio_route."))]


def wait_for_cache_listener(app: Any, timeout: float = 5.0) -> None:
    """The bot cache keeps nothing until its invalidation listener is subscribed."""
    cache = app.extensions["mammut"].bots
    cache.by_number(BOT_NUMBER)
    deadline = time.monotonic() + timeout
    while not cache.listening and time.monotonic() < deadline:
        time.sleep(0.01)


class TestUnderGunicorn:
    """Through a real gunicorn with the repo's settings: what the test client cannot show."""

    @pytest.fixture
    def server(self, redis_url: str, database: str, bot: Bot) -> Iterator[str]:
        port = free_port()
        env = {**os.environ, "PORT": str(port), "WEB_CONCURRENCY": "1", "REDIS_URL": redis_url, "DATABASE_URL": database,
               "ADMIN_API_TOKEN": ADMIN_TOKEN, "CREDENTIALS_KEY": CREDENTIALS_KEY, "MAMMUT_SMS_ENV": "production"}
        env.pop("PUBLIC_URL", None)
        repo = Path(__file__).resolve().parent.parent
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        process = subprocess.Popen([gunicorn, "--config", "gunicorn.conf.py", "webhook:create_app()"], cwd=repo, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_for(base + "/healthz", process)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)

    def test_proxied_https_message_without_slash_is_acknowledged(self, server: str, redis: redis_lib.Redis) -> None:
        """Signed over https://api.mammut.io/channels/sms, arriving as http with X-Forwarded-*: accepted, queued."""
        params = inbound_params()
        headers = {"X-Twilio-Signature": sign("https://api.mammut.io/channels/sms", params),
                   "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.mammut.io"}
        response = requests.post(server + "/channels/sms", data=params, headers=headers, allow_redirects=False, timeout=10)
        assert (200, "text/xml", EMPTY_TWIML) == (
            response.status_code, response.headers["Content-Type"], response.text)
        assert [params["MessageSid"]] == [m["sid"] for m in inbox(redis)]

    def test_oversized_form_gets_a_clean_413(self, server: str, redis: redis_lib.Redis) -> None:
        """A 65 KiB form is answered 413 over the wire, not with a reset connection or a 500."""
        response = requests.post(server + INBOUND_PATH, data=inbound_params(Body="x" * 65 * 1024), timeout=10)
        assert (413, 0) == (response.status_code, len(inbox(redis)))

    def test_chunked_message_is_read_and_acknowledged(self, server: str, redis: redis_lib.Redis) -> None:
        """A body sent chunked (no Content-Length), as some proxies forward it, is read like any other."""
        params = inbound_params(Body="troceado")
        headers = {"X-Twilio-Signature": sign(server + INBOUND_PATH, params),
                   "Content-Type": "application/x-www-form-urlencoded"}
        body = urlencode(params).encode()
        chunks = (body[i:i + 50] for i in range(0, len(body), 50))
        response = requests.post(server + INBOUND_PATH, data=chunks, headers=headers, timeout=10)
        assert (200, ["troceado"]) == (response.status_code, [m["body"] for m in inbox(redis)])

    def test_oversized_chunked_form_gets_a_clean_413(self, server: str, redis: redis_lib.Redis) -> None:
        """Without a Content-Length to refuse it by, the 64 KiB limit still holds while reading."""
        body = urlencode(inbound_params(Body="x" * 65 * 1024)).encode()
        chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))
        response = requests.post(server + INBOUND_PATH, data=chunks, timeout=10,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert (413, 0) == (response.status_code, len(inbox(redis)))


def _wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "gunicorn exited before it was ready"
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class _own_redis:
    """A throwaway Redis server (fakeredis over TCP) that a test can take away."""

    def __enter__(self) -> str:
        self._server = TcpFakeServer(("127.0.0.1", free_port()), server_type="redis")
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        host, port = self._server.server_address[:2]
        return f"redis://{host}:{port}/0"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _rendered(event: dict[str, Any]) -> str:
    """The event as production renders it, through shared.logging's processors."""
    from shared.logging import _scrub

    return repr(_scrub(full_numbers=False)(None, "warning", dict(event)))


def test_a_message_is_still_accepted_after_redis_lost_its_scripts(client: FlaskClient, bot: Bot,
                                                                   redis: redis_lib.Redis) -> None:
    """Scripts go by SHA on the hot path; after a Redis restart (SCRIPT FLUSH) they are loaded again and nothing is lost."""
    # Given Redis has forgotten every script
    redis.script_flush()
    # When Twilio delivers a message
    response = post_signed(client, inbound_params(Body="after restart"))
    # Then it is acknowledged, queued once, and a worker is woken once
    assert 200 == response.status_code
    assert ["after restart"] == [message["body"] for message in inbox(redis)]
    assert [(HANDLE_CONVERSATION, (CONVERSATION,))] == [(m.actor_name, tuple(m.args)) for m in queued_kicks(redis)]
