"""Delivery status callbacks: verified like inbound messages, recorded without ever moving backwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError

from shared import db, keys, metrics, optout
from shared.bots import Bot
from shared.optout import is_opted_out
from shared.schema import deliveries
from tests.conftest import BOT_ACCOUNT_SID, BOT_AUTH_TOKEN, BOT_NUMBER
from tests.test_signature import LOCAL, post_signed, sign
from webhook.twilio_auth import EMPTY_TWIML

STATUS_PATH = "/channels/sms/status"
RECIPIENT = "+15551230001"


def callback(sid: str, message_status: str, **extra: str) -> dict[str, str]:
    """The form Twilio posts to StatusCallback for a message the test bot sent."""
    return {"MessageSid": sid, "SmsSid": sid, "MessageStatus": message_status, "SmsStatus": message_status,
            "AccountSid": BOT_ACCOUNT_SID, "From": BOT_NUMBER, "To": RECIPIENT, "ApiVersion": "2010-04-01", **extra}


def post_status(client: FlaskClient, params: dict[str, str], path: str = STATUS_PATH) -> Any:
    return post_signed(client, params, path=path)


@pytest.fixture
def sql(database: str) -> Iterator[Engine]:
    """The test database, as the web process reaches it."""
    engine = db.make_engine(database, size=2)
    yield engine
    engine.dispose()


def recorded(sql: Engine, sid: str) -> dict[str, Any]:
    """The `deliveries` row of a MessageSid ({} when none)."""
    with sql.connect() as connection:
        row = connection.execute(select(deliveries).where(deliveries.c.sid == sid)).first()
    return dict(row._mapping) if row is not None else {}


@pytest.fixture
def sid() -> str:
    return "SM" + uuid.uuid4().hex


class TestRecording:
    """Each verified callback is recorded and acknowledged."""

    def test_callback_is_recorded_and_acknowledged(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                   sid: str, sql: Engine, logs: list[dict[str, Any]]) -> None:
        """A signed 'sent' callback: 200 empty TwiML, status stored, counted, logged without the token."""
        response = post_status(client, callback(sid, "sent"))
        assert (200, EMPTY_TWIML) == (response.status_code, response.get_data(as_text=True))
        assert "sent" == recorded(sql, sid)["status"]
        assert 1 == int(redis.hget(keys.METRIC_COUNTERS, metrics.field("sms_status_callbacks", status="sent")) or 0)
        [event] = [e for e in logs if e["event"] == "status.callback"]
        assert (sid, bot.id, "sent") == (event["message_sid"], event["bot_id"], event["status"])
        assert BOT_AUTH_TOKEN not in repr(logs)

    def test_path_with_trailing_slash_is_served_too(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                    sid: str, sql: Engine) -> None:
        """/channels/sms/status/ is served without a redirect, like /channels/sms/status."""
        response = post_status(client, callback(sid, "queued"), path=STATUS_PATH + "/")
        assert (200, "queued") == (response.status_code, recorded(sql, sid)["status"])

    def test_delivered_then_sent_leaves_delivered(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                  sid: str, sql: Engine) -> None:
        """Callbacks arrive out of order: a late 'sent' never overwrites 'delivered'."""
        post_status(client, callback(sid, "delivered"))
        response = post_status(client, callback(sid, "sent"))
        assert (200, "delivered") == (response.status_code, recorded(sql, sid)["status"])

    def test_error_code_is_kept_with_a_final_status(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                    sid: str, sql: Engine) -> None:
        """'undelivered' with 30003, then a late 'sending': the failure and its code stand."""
        post_status(client, callback(sid, "undelivered", ErrorCode="30003"))
        post_status(client, callback(sid, "sending"))
        stored = recorded(sql, sid)
        assert ("undelivered", 30003) == (stored["status"], stored["error_code"])

    def test_21610_opts_the_recipient_out_for_that_bot_number(self, client: FlaskClient, bot: Bot,
                                                              redis: redis_lib.Redis, sid: str, sql: Engine) -> None:
        """Twilio reporting 'replied STOP' (21610) marks the recipient opted out for the bot's number."""
        post_status(client, callback(sid, "failed", ErrorCode="21610"))
        with sql.connect() as connection:
            state = optout.read(connection, BOT_NUMBER, RECIPIENT)
        assert (True, True) == (is_opted_out(redis, BOT_NUMBER, RECIPIENT), state is not None and state.opted_out)

    def test_other_error_codes_do_not_opt_out(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                              sid: str) -> None:
        """A landline (30006) is a failure, not an opt-out."""
        post_status(client, callback(sid, "undelivered", ErrorCode="30006"))
        assert not is_opted_out(redis, BOT_NUMBER, RECIPIENT)

    def test_invented_status_is_acknowledged_but_not_stored(self, client: FlaskClient, bot: Bot,
                                                             redis: redis_lib.Redis, sid: str, sql: Engine,
                                                             logs: list[dict[str, Any]]) -> None:
        """A status Twilio never sends: 200 (no retries), nothing stored, logged as rejected, counted as 'other'
        (so callers cannot invent label values)."""
        response = post_status(client, callback(sid, "exploded"))
        assert (200, EMPTY_TWIML, {}) == (response.status_code, response.get_data(as_text=True), recorded(sql, sid))
        assert [metrics.field("sms_status_callbacks", status="other")] == redis.hkeys(keys.METRIC_COUNTERS)
        assert ["unknown_status"] == [e["reason"] for e in logs if e["event"] == "status.rejected"]

    def test_a_late_status_never_moves_the_status_back_but_keeps_its_time(self, client: FlaskClient, bot: Bot,
                                                                         sid: str, sql: Engine) -> None:
        """read, then delivered, then sent: 'read' stands, and each status keeps the time it was reported."""
        for status in ("read", "delivered", "sent"):
            post_status(client, callback(sid, status))
        stored = recorded(sql, sid)
        assert ("read", 5) == (stored["status"], stored["rank"])
        assert stored["read_at"] <= stored["delivered_at"] <= stored["sent_at"]

    def test_a_database_error_is_503_so_twilio_retries(self, client: FlaskClient, bot: Bot, sid: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        """With the database unreachable, the callback is refused with 503, never acknowledged."""
        def down(*_: Any, **__: Any) -> str:
            raise OperationalError("INSERT", {}, Exception("connection refused"))

        monkeypatch.setattr("shared.messagelog.record_delivery", down)
        assert 503 == post_status(client, callback(sid, "delivered")).status_code


class TestRefusals:
    """Callbacks are verified exactly like inbound messages; refused ones record nothing."""

    def test_unsigned_callback_is_403_and_records_nothing(self, client: FlaskClient, bot: Bot,
                                                          redis: redis_lib.Redis, sid: str, sql: Engine) -> None:
        """Without a signature: 403, and the status is not stored."""
        response = client.post(STATUS_PATH, data=callback(sid, "delivered"))
        assert (403, {}) == (response.status_code, recorded(sql, sid))

    def test_forged_21610_does_not_opt_anyone_out(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                                  sid: str) -> None:
        """A tampered callback cannot unsubscribe a user."""
        params = callback(sid, "sent")
        headers = {"X-Twilio-Signature": sign(LOCAL + STATUS_PATH, params)}
        response = client.post(STATUS_PATH, data={**params, "ErrorCode": "21610"}, headers=headers)
        assert (403, False) == (response.status_code, is_opted_out(redis, BOT_NUMBER, RECIPIENT))

    def test_wrong_account_is_403(self, client: FlaskClient, bot: Bot, sid: str) -> None:
        """Signed, but for another account: 403."""
        assert 403 == post_status(client, callback(sid, "sent", AccountSid="AC" + "e" * 32)).status_code

    def test_unknown_sender_number_is_404(self, client: FlaskClient, bot: Bot, sid: str) -> None:
        """The bot is found by From; a From no bot owns is 404."""
        assert 404 == post_status(client, callback(sid, "sent", From="+15009990000")).status_code

    @pytest.mark.parametrize("field", ["MessageSid", "MessageStatus", "From", "To"])
    def test_missing_field_is_400(self, client: FlaskClient, bot: Bot, sid: str, field: str) -> None:
        """Without the message, its status or the bot's number there is nothing to record: 400."""
        params = callback(sid, "sent")
        del params[field]
        assert 400 == post_status(client, params).status_code

    def test_non_numeric_error_code_is_not_500(self, client: FlaskClient, bot: Bot, redis: redis_lib.Redis,
                                               sid: str, sql: Engine) -> None:
        """A malformed ErrorCode is ignored; the status is still recorded."""
        response = post_status(client, callback(sid, "failed", ErrorCode="oops"))
        assert (200, "failed") == (response.status_code, recorded(sql, sid)["status"])
