"""GET /metrics: what every process recorded in Redis, and the queues, in Prometheus's text format."""

from __future__ import annotations

import time

import dramatiq
import pytest
import redis as redis_lib
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from twilio.request_validator import RequestValidator

from shared import keys, metrics
from shared.bots import Bot
from shared.tasks import kick_conversation, kick_delivery
from tests.conftest import BOT_AUTH_TOKEN, BOT_NUMBER


def _samples(client: FlaskClient, headers: dict[str, str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers=headers)
    assert 200 == response.status_code
    assert response.content_type.startswith("text/plain; version=")
    # An empty label is an absent label to Prometheus: accepted requests have no `reason`.
    return {
        (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if v))): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def _inbound(client: FlaskClient, bot: Bot, sid: str, token: str = BOT_AUTH_TOKEN) -> int:
    form = {"MessageSid": sid, "AccountSid": bot.account_sid, "From": "+15551230000", "To": BOT_NUMBER, "Body": "hi"}
    url = "http://localhost/channels/sms/"
    signature = RequestValidator(token).compute_signature(url, form)
    return client.post(url, data=form, headers={"X-Twilio-Signature": signature}).status_code


class TestAccess:
    """A scraper authenticates with the admin token, as the registry's clients do."""

    def test_without_the_admin_token_metrics_are_refused(self, client: FlaskClient) -> None:
        """Counts reveal traffic: no token, no metrics."""
        response = client.get("/metrics")
        assert (401, "Bearer") == (response.status_code, response.headers["WWW-Authenticate"])

    def test_a_wrong_token_is_refused(self, client: FlaskClient) -> None:
        """Only the admin token opens it."""
        assert 401 == client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code


class TestCounts:
    """The webhook's own counts and the workers' (recorded in Redis) appear in one scrape."""

    def test_inbound_accepted_duplicate_and_rejected_by_reason(self, client: FlaskClient, bot: Bot,
                                                                admin_headers: dict[str, str]) -> None:
        """One accepted, its retry a duplicate, a forged one rejected for its signature."""
        assert [200, 200, 403] == [_inbound(client, bot, "SM1"), _inbound(client, bot, "SM1"),
                                   _inbound(client, bot, "SM2", token="forged-token")]
        samples = _samples(client, admin_headers)
        assert 1 == samples[("sms_inbound_total", (("result", "accepted"),))]
        assert 1 == samples[("sms_inbound_total", (("result", "duplicate"),))]
        assert 1 == samples[("sms_inbound_total", (("reason", "bad_signature"), ("result", "rejected")))]

    def test_counts_and_latencies_recorded_by_another_process_are_served(
        self, client: FlaskClient, redis: redis_lib.Redis, admin_headers: dict[str, str],
    ) -> None:
        """What a worker dyno records with shared.metrics shows here, with the latency histogram."""
        # Given a worker tallied a send, a retry on 20429, a failure on 21211, and two latencies,
        # and flushed them (as its flusher does every second)
        tally = metrics.Tally()
        tally.incr("sms_outbound", result="sent")
        tally.incr("sms_outbound", result="retried", code=20429)
        tally.incr("sms_outbound", result="failed", code=21211)
        tally.observe("sms_webhook_to_twilio_seconds", 0.3)
        tally.observe("sms_webhook_to_twilio_seconds", 7.0)
        tally.flush(redis)
        # Then
        samples = _samples(client, admin_headers)
        assert 1 == samples[("sms_outbound_total", (("code", "20429"), ("result", "retried")))]
        assert 1 == samples[("sms_outbound_total", (("code", "21211"), ("result", "failed")))]
        assert 1 == samples[("sms_webhook_to_twilio_seconds_bucket", (("le", "0.5"),))]
        assert 2 == samples[("sms_webhook_to_twilio_seconds_bucket", (("le", "10.0"),))]
        assert 2 == samples[("sms_webhook_to_twilio_seconds_count", ())]
        assert 7.3 == pytest.approx(samples[("sms_webhook_to_twilio_seconds_sum", ())])


class TestTally:
    """A worker adds its counts up in memory and writes them in one round trip a second."""

    def test_a_flush_adds_to_what_is_there_and_the_next_starts_from_zero(self, redis: redis_lib.Redis) -> None:
        # Given counts already in Redis from another process, and 3 sends tallied here
        metrics.incr(redis, "sms_outbound", result="sent")
        tally = metrics.Tally()
        for _ in range(3):
            tally.incr("sms_outbound", result="sent")
        tally.observe("sms_engine_latency_seconds", 0.2)

        # When it is flushed twice
        tally.flush(redis)
        tally.flush(redis)

        # Then each count was added once
        assert "4" == redis.hget(keys.METRIC_COUNTERS, metrics.field("sms_outbound", result="sent"))
        assert ("1", 0.2) == (
            redis.hget(keys.METRIC_HISTOGRAMS, metrics.field("sms_engine_latency_seconds", le="0.25")),
            float(redis.hget(keys.METRIC_HISTOGRAMS, "sms_engine_latency_seconds_sum")),
        )

    def test_a_bots_engine_answer_times_are_kept_to_the_latest_thousand(self, redis: redis_lib.Redis) -> None:
        """However many answers a bot's engine gave, Redis keeps its latest LATENCY_SAMPLES, newest first."""
        tally = metrics.Tally()
        for n in range(metrics.LATENCY_SAMPLES + 5):
            tally.engine_answered(7, n / 1000)
        tally.flush(redis)

        kept = redis.lrange(keys.engine_latency(7), 0, -1)
        assert metrics.LATENCY_SAMPLES == len(kept)
        assert (metrics.LATENCY_SAMPLES + 4) / 1000 == float(kept[0].split()[1])

    def test_counts_a_flush_could_not_write_are_kept_for_the_next(self, redis: redis_lib.Redis) -> None:
        # Given a tally whose first flush meets a Redis that does not answer
        tally = metrics.Tally()
        tally.incr("sms_outbound", result="sent")
        unreachable = redis_lib.Redis(port=1, socket_connect_timeout=0.2)
        with pytest.raises(redis_lib.ConnectionError):
            tally.flush(unreachable)

        # When the next flush reaches Redis
        tally.incr("sms_outbound", result="sent")
        tally.flush(redis)

        # Then both sends are counted
        assert "2" == redis.hget(keys.METRIC_COUNTERS, metrics.field("sms_outbound", result="sent"))


class TestQueues:
    """Queue depths, pending conversations and dead letters are read at scrape time."""

    def test_queue_depths_pending_and_dead_letters(self, client: FlaskClient, app: object, redis: redis_lib.Redis,
                                                   admin_headers: dict[str, str]) -> None:
        """Two conversation kicks, one delayed send, one pending conversation and one dead letter."""
        from webhook.deps import get_broker

        with client.application.app_context():
            broker: dramatiq.Broker = get_broker()
        kick_conversation("1:+15551230000", broker=broker)
        kick_conversation("1:+15551230001", broker=broker)
        kick_delivery("1:+15551230000", "reply-1", delay_ms=60_000, broker=broker)
        redis.zadd(keys.PENDING, {"1:+15551230000": 1.0})
        redis.zadd("dramatiq:outbound.XQ", {"dead-message": 1.0})
        samples = _samples(client, admin_headers)
        assert 2 == samples[("sms_queue_depth", (("queue", "conversations"),))]
        assert 1 == samples[("sms_queue_depth", (("queue", "outbound.DQ"),))]
        assert 0 == samples[("sms_queue_depth", (("queue", "outbound"),))]
        assert 1 == samples[("sms_pending_conversations", (("queue", "conversations"),))]
        assert 1 == samples[("sms_dead_letters", (("queue", "outbound"),))]

    def test_the_log_backlog_shows_records_waiting_for_the_database(
            self, client: FlaskClient, redis: redis_lib.Redis, admin_headers: dict[str, str]) -> None:
        """While the database is unreachable the log's records wait in Redis: the backlog says how many."""
        redis.rpush(keys.LOG_OUTBOX, "{}", "{}", "{}")
        redis.rpush(keys.LOG_REFUSED, "{}")
        samples = _samples(client, admin_headers)
        assert (3, 1) == (samples[("sms_log_backlog", (("queue", "waiting"),))],
                          samples[("sms_log_backlog", (("queue", "refused"),))])


class TestWebProcessTally:
    """A web worker counts the texts it accepts in memory and writes the counts to Redis itself."""

    def test_a_web_processs_counts_reach_redis_within_seconds_and_as_it_stops(
            self, worker_env: dict[str, str], bot: Bot, redis: redis_lib.Redis) -> None:
        """Without any scrape: a text and its retry are counted in Redis within seconds (each web
        worker writes its tally every second), and a text accepted just before a graceful stop is
        counted too (written as the worker exits)."""
        import requests

        from tests.conftest import free_port
        from tests.support.processes import start_web
        from tests.test_inbound import counter

        port = free_port()
        url = f"http://127.0.0.1:{port}/channels/sms/"

        def text(sid: str) -> int:
            form = {"MessageSid": sid, "AccountSid": bot.account_sid, "From": "+15551230000", "To": BOT_NUMBER,
                    "Body": "hi"}
            signature = RequestValidator(BOT_AUTH_TOKEN).compute_signature(url, form)
            return requests.post(url, data=form, headers={"X-Twilio-Signature": signature}, timeout=10).status_code

        web = start_web({**worker_env, "PUBLIC_URL": ""}, port)
        try:
            assert [200, 200] == [text("SM" + "1" * 32), text("SM" + "1" * 32)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and counter(redis, "sms_inbound", result="duplicate") < 1:
                time.sleep(0.1)
            assert (1, 1) == (counter(redis, "sms_inbound", result="accepted"),
                              counter(redis, "sms_inbound", result="duplicate"))
            assert 200 == text("SM" + "2" * 32)
        finally:
            web.stop(10)
        assert 2 == counter(redis, "sms_inbound", result="accepted")
