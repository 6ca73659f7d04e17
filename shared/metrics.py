"""Counters and histograms kept in Redis, so every process (a worker dyno has no open port)
records them and the web process serves them at /metrics."""

from __future__ import annotations

import math
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from shared import keys
from shared.background import Periodic

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Each bot's latest engine answer times kept for the console's overview (a capped Redis list).
LATENCY_SAMPLES = 1000
DAY = 24 * 3600

COUNTERS = {
    "sms_inbound": "Inbound webhook requests, by result and reason.",
    "sms_status_callbacks": "Delivery status callbacks received, by status.",
    "sms_engine_calls": "Conversation engine calls, by outcome.",
    "sms_outbound": "Outbound messages, by result (sent, retried, failed, suppressed) and Twilio code.",
    "sms_reconciled": "Sends whose outcome was unknown, settled by how (callback, lookup-found, lookup-absent-resent).",
    "sms_answers_capped": "Engine answers (and callbacks, per recipient) cut to the bot's max-replies or max-segments.",
    "sms_callbacks_refused": "Engine callbacks refused with 429, by reason (queued: max-queued-replies, minute).",
    "sms_unanswered": "Inbound messages the engine was not asked about, by reason (from_bot, rate_limited, handed_off).",
    "sms_handoff_forwards": "Handed-off conversations' messages forwarded to a bot's handoff-url, by outcome.",
    "sms_handoffs": "Conversations handed to a human or given back, by event (paused, resumed) and by whom.",
}
HISTOGRAMS = {
    "sms_engine_latency_seconds": "Conversation engine call duration.",
    "sms_webhook_to_twilio_seconds": "Time from the webhook receiving a message to Twilio accepting a reply.",
}


def field(name: str, **labels: object) -> str:
    """The Redis hash field of one labelled series, e.g. sms_inbound{result="accepted"}."""
    if not labels:
        return name
    inner = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def incr(redis: Any, name: str, amount: int = 1, **labels: object) -> None:
    """Count one event; `redis` may be a pipeline, so a caller can batch it with its own writes."""
    redis.hincrby(keys.METRIC_COUNTERS, field(name, **labels), amount)


def observe(redis: Any, name: str, value: float) -> None:
    redis.hincrby(keys.METRIC_HISTOGRAMS, field(name, le=bucket_of(value)), 1)
    redis.hincrbyfloat(keys.METRIC_HISTOGRAMS, field(name + "_sum"), value)


def bucket_of(value: float) -> str:
    return next((str(b) for b in LATENCY_BUCKETS if value <= b), "+Inf")


class Tally:
    """A process's counts and observations, added up in memory and written to Redis together (every
    second and at shutdown: worker.middleware in a worker, TallyFlush in each web worker, and /metrics
    before it reads them): one round trip a second for all of them, instead of three to five
    commands on every message. A process killed between flushes loses at most that second's
    counts: these are metrics; the conversation log keeps the records."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.forget()

    def forget(self) -> None:
        """Start afresh, as a new process does (the tests' service is new for every test)."""
        self._counts: Counter[tuple[str, str]] = Counter()
        self._sums: defaultdict[str, float] = defaultdict(float)
        self._samples: defaultdict[str, list[str]] = defaultdict(list)

    def incr(self, name: str, amount: int = 1, **labels: object) -> None:
        with self._lock:
            self._counts[(keys.METRIC_COUNTERS, field(name, **labels))] += amount

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._counts[(keys.METRIC_HISTOGRAMS, field(name, le=bucket_of(value)))] += 1
            self._sums[field(name + "_sum")] += value

    def engine_answered(self, bot_id: int, seconds: float, at: float | None = None) -> None:
        """One answer of the bot's engine took `seconds` (kept per bot for the console's overview)."""
        with self._lock:
            self._samples[keys.engine_latency(bot_id)].append(f"{time.time() if at is None else at:.3f} {seconds:.4f}")

    def flush(self, redis: Any) -> None:
        """Write what was added since the last flush; if Redis refuses, keep it for the next one."""
        with self._lock:
            counts, sums, samples = self._counts, self._sums, self._samples
            self._counts, self._sums, self._samples = Counter(), defaultdict(float), defaultdict(list)
        if not counts and not sums and not samples:
            return
        pipe = redis.pipeline(transaction=False)
        for (key, series), amount in counts.items():
            pipe.hincrby(key, series, amount)
        for series, total in sums.items():
            pipe.hincrbyfloat(keys.METRIC_HISTOGRAMS, series, total)
        for key, values in samples.items():
            pipe.lpush(key, *values)
            pipe.ltrim(key, 0, LATENCY_SAMPLES - 1)
        try:
            pipe.execute()
        except Exception:
            with self._lock:  # nothing is lost to a blip: the next flush writes it
                self._counts.update(counts)
                for series, total in sums.items():
                    self._sums[series] += total
                for key, values in samples.items():
                    self._samples[key][:0] = values
            raise


# The process's tally. The web process counts the texts it accepts and recognises as retries there
# (shared.conversations.accept_inbound); its refusals, rare, go to Redis at once (incr).
TALLY = Tally()


class TallyFlush(Periodic):
    """Writes the process's tally to Redis every second: a web worker's (gunicorn.conf.py starts it
    in each; a worker process flushes its own with its send counts, worker.background.MetricsFlush)."""

    name = "tally_flush"
    first_pause = pause_after_failure = FLUSH_SECONDS = 1.0

    def __init__(self, redis: Any) -> None:
        super().__init__()
        self.redis = redis

    def turn(self) -> float:
        TALLY.flush(self.redis)
        return self.FLUSH_SECONDS


def engine_latency(redis: Any, bot_ids: list[int], now: float | None = None) -> dict[int, dict[str, float] | None]:
    """Per bot, the median and 95th percentile (nearest rank) of its engine's answer times over the
    last 24 hours, among its latest LATENCY_SAMPLES answers; None for a bot with none."""
    since = (time.time() if now is None else now) - DAY
    pipe = redis.pipeline(transaction=False)
    for bot_id in bot_ids:
        pipe.lrange(keys.engine_latency(bot_id), 0, -1)
    figures: dict[int, dict[str, float] | None] = {}
    for bot_id, raw in zip(bot_ids, pipe.execute()):
        seconds = sorted(float(took) for at, took in (sample.split() for sample in raw) if float(at) >= since)
        figures[bot_id] = {"median": _rank(seconds, 0.5), "p95": _rank(seconds, 0.95),
                           "answers": len(seconds)} if seconds else None
    return figures


def _rank(ordered: list[float], q: float) -> float:
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


_SERIES = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>.*)\})?$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _parse(series: str) -> tuple[str, dict[str, str]]:
    match = _SERIES.match(series)
    if match is None:
        return series, {}
    return match["name"], dict(_LABEL.findall(match["labels"] or ""))


class RedisCollector(Collector):
    """Renders what every process recorded in Redis, plus queue depths read at scrape time."""

    def __init__(self, redis: Any, gauges: dict[str, tuple[str, Any]] | None = None) -> None:
        self._redis = redis
        self._gauges = gauges or {}

    def collect(self) -> Iterator[Any]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(keys.METRIC_COUNTERS)
        pipe.hgetall(keys.METRIC_HISTOGRAMS)
        counters, histograms = pipe.execute()
        yield from self._counters(counters)
        yield from self._histograms(histograms)
        for name, (documentation, read) in self._gauges.items():
            gauge = GaugeMetricFamily(name, documentation, labels=["queue"])
            for label, value in read(self._redis).items():
                gauge.add_metric([label], value)
            yield gauge

    def _counters(self, raw: dict[str, str]) -> Iterator[CounterMetricFamily]:
        series: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for key, value in raw.items():
            name, labels = _parse(key)
            series[name].append((labels, float(value)))
        for name, documentation in COUNTERS.items():
            label_names = sorted({label for labels, _ in series[name] for label in labels})
            family = CounterMetricFamily(name, documentation, labels=label_names)
            for labels, value in series[name]:
                family.add_metric([labels.get(label, "") for label in label_names], value)
            yield family

    def _histograms(self, raw: dict[str, str]) -> Iterator[HistogramMetricFamily]:
        for name, documentation in HISTOGRAMS.items():
            counts = {b: 0.0 for b in [*map(str, LATENCY_BUCKETS), "+Inf"]}
            for key, value in raw.items():
                series, labels = _parse(key)
                if series == name and labels.get("le") in counts:
                    counts[labels["le"]] += float(value)
            cumulative, buckets = 0.0, []
            for bound, count in counts.items():
                cumulative += count
                buckets.append((bound, cumulative))
            total = float(raw.get(name + "_sum", 0))
            yield HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)
