"""Each bot's daily budget of sends (its max-messages-per-day), shared by every worker process.

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
        self._unflushed: Counter[int] = Counter()
        self._totals: dict[int, int] = {}
        self._day = utc_day()

    def sent(self, bot_id: int) -> None:
        with self._lock:
            self._unflushed[bot_id] += 1

    def exhausted(self, bot: Bot) -> bool:
        """Whether `bot` has used up today's budget (never, with max-messages-per-day 0)."""
        limit = bot.limits.max_messages_per_day
        if not limit:
            return False
        with self._lock:
            if self._day != utc_day():
                return self._unflushed[bot.id] >= limit  # a new day: yesterday's totals no longer count
            return self._totals.get(bot.id, 0) + self._unflushed[bot.id] >= limit

    def flush(self, redis: Any) -> None:
        """Add this process's sends to today's totals and read every bot's back; what Redis
        refuses is kept for the next flush."""
        with self._lock:
            unflushed, self._unflushed = self._unflushed, Counter()
        day = utc_day()
        key = keys.daily_sends(day)
        pipe = redis.pipeline(transaction=False)
        for bot_id, count in unflushed.items():
            pipe.hincrby(key, str(bot_id), count)
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
            self._totals = {int(bot_id): int(count) for bot_id, count in totals.items()}


# The worker process's count.
DAILY_SENDS = DailySends()
