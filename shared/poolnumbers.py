"""Numbers a bot's Messaging Service has been seen sending from, its unlisted pool numbers included.

They are bot numbers too: the loop guard (worker.conversation) never answers a text from one, and
the registry (shared.bots) gives none to another bot. Learnt from Twilio's answer to a send
(`from`) and from status callbacks (`From`), kept in one Redis hash (number -> bot id), and read
by each process at most once a second: the hash holds a few numbers per service.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis as redis_lib

from shared import keys

REFRESH_SECONDS = 1.0


class PoolNumbers:
    """This process's view of keys.POOL_NUMBERS."""

    def __init__(self) -> None:
        self._owners: dict[str, int] = {}
        self._read_at = 0.0
        self._lock = threading.Lock()

    def learn(self, redis: Any, number: str | None, bot_id: int) -> None:
        """`number` sent a message of `bot_id`'s service; written only when this process did not know it."""
        if number and self._owners.get(number) != bot_id:
            redis.hset(keys.POOL_NUMBERS, number, bot_id)
            self._owners[number] = bot_id

    def owner(self, redis: Any, number: str) -> int | None:
        """The bot whose service has sent from `number`, if any."""
        with self._lock:
            if time.monotonic() - self._read_at > REFRESH_SECONDS:
                self._owners = {key: int(value) for key, value in redis.hgetall(keys.POOL_NUMBERS).items()}
                self._read_at = time.monotonic()
            return self._owners.get(number)

    def forget(self) -> None:
        """Read the hash again at the next look (tests, after a flush)."""
        with self._lock:
            self._owners, self._read_at = {}, 0.0


POOL_NUMBERS = PoolNumbers()


def pool_number_owner(redis: Any, number: str) -> int | None:
    """The bot whose service has sent from `number`, read now (the registry's check); None also when
    Redis cannot say, as the database's unique numbers still hold."""
    try:
        owner = redis.hget(keys.POOL_NUMBERS, number)
    except redis_lib.RedisError:
        return None
    return int(owner) if owner is not None else None
