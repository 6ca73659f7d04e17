"""Wake-ups: how a worker learns that a conversation has something to do, at one Redis command each.

A wake-up is a hint, not the work. What a conversation must do lives in its own keys (its inbox,
processing list and outbox, and its entry in the pending set: shared.conversations), so a lost
wake-up delays a conversation and loses nothing: the sweeper (worker.sweeper) wakes every
conversation that has gone STALE_SECONDS without progress. A wake-up therefore needs none of the
bookkeeping Dramatiq's Redis broker keeps for messages that must not be lost (a hash of bodies, a
set of each worker's unacknowledged ids, a heartbeat on every fetch, an ack after every message),
which cost about nine Redis commands for every conversation woken.

So the conversations queue is one Redis list of encoded Dramatiq messages: the webhook's accept
step pushes one (RPUSH, inside its Lua step), `HintedBroker.enqueue` pushes the sweeper's and the
worker's own, and each worker process pops them in batches (one LPOP for up to its prefetch).
Dramatiq's worker, its middleware (retries, time limits) and its actors are unchanged; delayed
wake-ups still wait in Dramatiq's delay queue and join the list when due. A worker that stops
gracefully pushes back what it took and did not start; one that is killed loses what it held in
memory, which the sweeper makes good.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

import redis as redis_lib
from dramatiq import Message
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import compute_backoff, current_millis
from dramatiq.errors import ConnectionClosed, DecodeError, QueueJoinTimeout

from shared.logging import get_logger

log = get_logger(__name__)


# KEYS: dramatiq's list of a queue's message ids, its hash of their bodies, the hints list.
# Every body goes, those a worker had taken too (a duplicate wake-up does no harm).
_ADOPT_LUA = """
local bodies = redis.call('HVALS', KEYS[2])
for i = 1, #bodies do redis.call('RPUSH', KEYS[3], bodies[i]) end
redis.call('DEL', KEYS[1], KEYS[2])
return #bodies
"""


class HintedBroker(RedisBroker):
    """Dramatiq's Redis broker, with one queue (`hinted_queue`) kept as a plain list at `hints_key`."""

    def __init__(self, *, hinted_queue: str, hints_key: str, **options: Any) -> None:
        super().__init__(**options)
        self.hinted_queue = hinted_queue
        self.hints_key = hints_key
        self._consumers: weakref.WeakSet[HintConsumer] = weakref.WeakSet()

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        if queue_name != self.hinted_queue:
            return super().consume(queue_name, prefetch, timeout)
        self._adopt_legacy()
        consumer = HintConsumer(self, prefetch, timeout)
        self._consumers.add(consumer)
        return consumer

    def _adopt_legacy(self) -> None:
        """Move wake-ups an earlier release queued the Dramatiq way (waiting, or taken by a worker
        that is gone) onto the list: after an upgrade nobody consumes them there."""
        name = f"{self.namespace}:{self.hinted_queue}"
        try:
            moved = self.client.eval(_ADOPT_LUA, 3, name, name + ".msgs", self.hints_key)
        except redis_lib.ConnectionError as error:
            raise ConnectionClosed(error) from None
        if moved:
            log.info("wake_up.adopted", count=moved)

    def flush(self, queue_name: str) -> None:
        super().flush(queue_name)
        if queue_name == self.hinted_queue:
            self.client.delete(self.hints_key)

    def join(self, queue_name: str, *, interval: int = 100, timeout: int | None = None) -> None:
        """Wait until the queue is empty and this process's workers are done with what they took
        (as Dramatiq's join does; for tests)."""
        if queue_name != self.hinted_queue:
            return super().join(queue_name, interval=interval, timeout=timeout)
        deadline = timeout and time.monotonic() + timeout / 1000
        while True:
            if deadline and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)
            # The list first: a consumer counts what it pops as in hand before popping it.
            if self.client.llen(self.hints_key) == 0 and not any(c.in_hand for c in list(self._consumers)) \
                    and self.do_qsize(queue_name) == 0:  # its delay queue
                return
            time.sleep(interval / 1000)

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        if message.queue_name != self.hinted_queue or delay is not None:
            return super().enqueue(message, delay=delay)
        self.emit_before("enqueue", message, delay)
        self.client.rpush(self.hints_key, message.encode())
        self.emit_after("enqueue", message, delay)
        return message

    def dead_letter(self, message: Message[Any]) -> None:
        """Keep a wake-up whose actor failed for good where Dramatiq keeps its dead letters
        (`<namespace>:<queue>.XQ`, scored by when it died, bodies in `.XQ.msgs`), for a week."""
        name = f"{self.namespace}:{self.hinted_queue}.XQ"
        now = current_millis()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(name, {message.message_id: now})
        pipe.hset(name + ".msgs", message.message_id, message.encode())
        pipe.zremrangebyscore(name, "-inf", now - self.dead_message_ttl)
        pipe.execute()


class HintConsumer(Consumer):
    """Pops wake-ups in batches of up to `prefetch` less those still being worked on, and polls
    with Dramatiq's backoff (up to `timeout` ms) while the list is empty."""

    def __init__(self, broker: HintedBroker, prefetch: int, timeout: int) -> None:
        self._broker = broker
        self._client = broker.client
        self._key = broker.hints_key
        self._prefetch = prefetch
        self._timeout = timeout
        self._taken: deque[bytes] = deque()  # popped, not yet handed to the worker
        self._working = 0  # handed to the worker, not yet acknowledged
        self._fetching = False
        self._lock = threading.Lock()  # the worker's threads ack; the consumer's thread counts
        self._misses = 0

    @property
    def in_hand(self) -> bool:
        """Whether this consumer holds wake-ups: popped, handed to the worker, or being popped."""
        return self._fetching or bool(self._taken) or self._working > 0

    def __next__(self) -> MessageProxy | None:
        while True:
            if not self._taken and not self._fetch():
                self._misses, backoff_ms = compute_backoff(self._misses, max_backoff=self._timeout)
                time.sleep(backoff_ms / 1000)
                return None
            self._misses = 0
            with self._lock:
                self._working += 1  # before it leaves _taken, so it is always counted somewhere
                data = self._taken.popleft()
            try:
                return MessageProxy(Message.decode(data))
            except DecodeError:
                # Nothing of ours writes such a thing; whatever it was for, the sweeper covers it.
                self._done(1)
                log.warning("wake_up.undecodable", body=data[:200])

    def _fetch(self) -> bool:
        with self._lock:
            wanted = self._prefetch - self._working
        if wanted <= 0:
            return False
        self._fetching = True
        try:
            popped = self._client.lpop(self._key, wanted)
            self._taken.extend(popped or ())
        except redis_lib.ConnectionError as error:
            raise ConnectionClosed(error) from None
        finally:
            self._fetching = False
        return bool(popped)

    def ack(self, message: MessageProxy) -> None:
        self._done(1)

    def nack(self, message: MessageProxy) -> None:
        self._done(1)
        try:
            self._broker.dead_letter(message._message)
        except redis_lib.ConnectionError as error:
            raise ConnectionClosed(error) from None

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Put wake-ups handed to the worker and never started back at the front, in order, with
        those popped and not handed out yet (which were behind them)."""
        bodies = [message.encode() for message in messages]
        self._done(len(bodies))
        taken, self._taken = list(self._taken), deque()
        self._push_back(bodies + taken)

    def _done(self, count: int) -> None:
        # Not below 0: a consumer that replaced one lost to a connection error is told of its
        # predecessor's messages too.
        with self._lock:
            self._working = max(self._working - count, 0)

    def close(self) -> None:
        """Put back what was popped and never handed to the worker."""
        bodies, self._taken = list(self._taken), deque()
        self._push_back(bodies)

    def _push_back(self, bodies: list[bytes]) -> None:
        if not bodies:
            return
        try:
            self._client.lpush(self._key, *reversed(bodies))
        except redis_lib.ConnectionError as error:
            raise ConnectionClosed(error) from None
