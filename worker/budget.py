"""Each bot's daily budget of sends (its max-messages-per-day) and of segments (its
max-segments-per-day: what Twilio bills, so a day's cost is bounded whatever the length of each
text), shared by every worker process.

Each process counts its own sends in memory and, once a second (with the metrics, worker.background),
adds them to one Redis hash per UTC day and reads every bot's total back, in one round trip. A
process holds a bot's replies back once that total plus its own unflushed sends reach the limit:
within one process exactly; across processes a bot may overshoot by what the others sent in the
last second. Nothing is added to a message's own path: a send costs a dict update.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from shared import keys
from shared.bots import Bot

# A held-back reply looks again this often, so raising the limit releases it within minutes.
RECHECK_SECONDS = 300.0
# A day's totals outlive it by this much (a flush just after midnight still finds yesterday's).
DAY_TTL_SECONDS = 2 * 86400


def utc_day(at: float | None = None) -> str:
    return time.strftime("%Y%m%d", time.gmtime(time.time() if at is None else at))


def seconds_to_next_day(at: float | None = None) -> float:
    now = time.time() if at is None else at
    return 86400.0 - now % 86400.0


class DailySends:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.forget()

    def forget(self) -> None:
        """Start afresh, as a new process does (the tests' service is new for every test)."""
        # Keyed by the daily hash's field: the bot id for messages, `<id>:segments` for segments.
        self._unflushed: Counter[str] = Counter()
        self._totals: dict[str, int] = {}
        self._day = utc_day()

    def sent(self, bot_id: int, segments: int = 1) -> None:
        with self._lock:
            self._unflushed[str(bot_id)] += 1
            self._unflushed[_segments_field(bot_id)] += segments

    def exhausted(self, bot: Bot) -> bool:
        """Whether `bot` has used up today's messages or today's segments (a limit of 0: none)."""
        limits = ((str(bot.id), bot.limits.max_messages_per_day),
                  (_segments_field(bot.id), bot.limits.max_segments_per_day))
        with self._lock:
            new_day = self._day != utc_day()  # a new day: yesterday's totals no longer count
            return any(limit and (0 if new_day else self._totals.get(field, 0)) + self._unflushed[field] >= limit
                       for field, limit in limits)

    def flush(self, redis: Any) -> None:
        """Add this process's sends to today's totals and read every bot's back; what Redis
        refuses is kept for the next flush."""
        with self._lock:
            unflushed, self._unflushed = self._unflushed, Counter()
        day = utc_day()
        key = keys.daily_sends(day)
        pipe = redis.pipeline(transaction=False)
        for field, count in unflushed.items():
            pipe.hincrby(key, field, count)
        if unflushed:
            pipe.expire(key, DAY_TTL_SECONDS)
        pipe.hgetall(key)
        try:
            totals = pipe.execute()[-1]
        except Exception:
            with self._lock:
                self._unflushed.update(unflushed)
            raise
        with self._lock:
            self._day = day
            self._totals = {field: int(count) for field, count in totals.items()}


def _segments_field(bot_id: int) -> str:
    return f"{bot_id}:segments"


# The worker process's count.
DAILY_SENDS = DailySends()
