"""Numbers a bot's Messaging Service has been seen sending from, its unlisted pool numbers included.

They are bot numbers too: the loop guard (worker.conversation) never answers a text from one, and
the registry (shared.bots) gives none to another bot. Learnt from Twilio's answer to a send
(`from`) and from status callbacks (`From`), kept in one Redis hash (number -> bot id), and read
by each process at most once a second: the hash holds a few numbers per service.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
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
        """`number` sent a message of `bot_id`'s service; written only when this process did not know
        it, and never when the operator took it from that bot lately (the word is an earlier send's)."""
        if number and self._owners.get(number) != bot_id:
            redis.eval(LEARN_LUA, 2, keys.POOL_NUMBERS, keys.POOL_NUMBERS_RELEASED, number, bot_id)
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

# How long a number taken from a bot stays out of its reach: Twilio reports a message's status for
# up to three days after the send (a late "delivered", say).
RELEASED_SECONDS = 7 * 86400

# KEYS: the pool numbers, those released. ARGV: the number, the bot its service sent it from.
LEARN_LUA = """
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: the pool numbers, those released. ARGV[1]: the bot; ARGV[2..]: the numbers it gave up (none:
# all of its own). Each listed number is remembered as released from the bot, learnt or not: a
# listed number too may have sent a message whose callback is still to come.
RELEASE_LUA = """
local numbers = {}
if #ARGV > 1 then
  for i = 2, #ARGV do numbers[#numbers + 1] = ARGV[i] end
else
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do numbers[#numbers + 1] = fields[i] end
end
for _, number in ipairs(numbers) do
  if redis.call('HGET', KEYS[1], number) == ARGV[1] then redis.call('HDEL', KEYS[1], number) end
  redis.call('HSET', KEYS[2], number, ARGV[1])
end
if #numbers > 0 then redis.call('EXPIRE', KEYS[2], __RELEASED_SECONDS__) end
""".replace("__RELEASED_SECONDS__", str(RELEASED_SECONDS))


def release(redis: Any, bot_id: int, numbers: Collection[str] | None = None) -> None:
    """The operator took these numbers (or, with None, the whole bot) away: its service sending from
    them no longer makes them its own, so another bot may be given them."""
    if numbers is None or numbers:
        redis.eval(RELEASE_LUA, 2, keys.POOL_NUMBERS, keys.POOL_NUMBERS_RELEASED, bot_id, *sorted(numbers or ()))


def pool_number_owner(redis: Any, number: str) -> int | None:
    """The bot whose service has sent from `number`, read now (the registry's check); None also when
    Redis cannot say, as the database's unique numbers still hold."""
    try:
        owner = redis.hget(keys.POOL_NUMBERS, number)
    except redis_lib.RedisError:
        return None
    return int(owner) if owner is not None else None
