"""How many engine calls and handoff forwards each bot may have in flight in one worker process
(its max-concurrent-engine-calls; by default a quarter of the process's threads), so a slow or
hostile engine or handoff-url holds only its own bot's share of the threads and other bots'
conversations keep moving.

A conversation that finds its bot's slots all taken does not wait for one: it lets its thread go
and comes back shortly (worker.conversation), its message first in line.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from shared.bots import Bot
from shared.redis import process_threads

# The default share of a process's threads one bot's engine calls may hold.
DEFAULT_SHARE = 4


def default_limit() -> int:
    return max(1, process_threads() // DEFAULT_SHARE)


class EngineSlots:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}

    @contextmanager
    def taken(self, bot: Bot) -> Iterator[bool]:
        """Take one of `bot`'s slots for the block; yields False (taking none) when all are in use."""
        limit = bot.limits.max_concurrent_engine_calls or default_limit()
        with self._lock:
            in_flight = self._in_flight.get(bot.id, 0)
            if in_flight >= limit:
                taken = False
            else:
                taken = True
                self._in_flight[bot.id] = in_flight + 1
        try:
            yield taken
        finally:
            if taken:
                with self._lock:
                    left = self._in_flight[bot.id] - 1
                    if left:
                        self._in_flight[bot.id] = left
                    else:
                        del self._in_flight[bot.id]

    def in_flight(self, bot_id: int) -> int:
        return self._in_flight.get(bot_id, 0)


# The worker process's slots.
ENGINE_SLOTS = EngineSlots()
