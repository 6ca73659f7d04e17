"""Leases: Redis locks with a short expiry that this process renews while it holds them.

A worker killed mid-message stops renewing, so its lease lapses within LEASE_SECONDS and
another worker can take the conversation over; a live holder never loses it to slowness: one
thread renews every lease the process holds in one round trip, every RENEW_EVERY from the start
of the previous pass, so neither the number of leases nor a slow pass lets one lapse.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from shared.logging import get_logger
from shared.redis import script

log = get_logger(__name__)

LEASE_SECONDS = 10.0
RENEW_EVERY = LEASE_SECONDS / 3

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: the leases. ARGV: the expiry in ms, then each lease's token in KEYS' order.
# Renews those still ours; returns the (1-based) positions of those that are not.
_RENEW_ALL = """
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""


class Lease:
    """One held lock; use as a context manager after a successful `acquire`."""

    def __init__(self, redis: Any, key: str) -> None:
        self.redis = redis
        self.key = key
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost = False  # set by the renewer when the key no longer holds our token

    def acquire(self) -> bool:
        return self.granted(self.redis.set(self.key, self.token, nx=True, px=int(LEASE_SECONDS * 1000)))

    def request(self, pipeline: Any) -> None:
        """Ask for the lease as a command of `pipeline`, then pass its result to `granted`: a caller
        can take the lease and read what it guards in one round trip (reads queued after the
        request see the state the lease now guards; they are simply unused if it was refused)."""
        pipeline.set(self.key, self.token, nx=True, px=int(LEASE_SECONDS * 1000))

    def granted(self, result: Any) -> bool:
        """Whether the SET of `acquire` or `request` took the lease; a taken lease is kept renewed."""
        self.held = bool(result)
        if self.held:
            _renewer.track(self)
        return self.held

    def renew(self) -> bool:
        return bool(script(self.redis, _RENEW)(keys=[self.key], args=[self.token, int(LEASE_SECONDS * 1000)]))

    def forget(self) -> None:
        """Stop renewing and count the lease as let go, for a caller whose own script deletes the
        key (checking the token) in the step that ends its work."""
        if self.held:
            _renewer.forget(self)
            self.held = False

    def release(self, pipeline: Any = None) -> None:
        """Let go; with `pipeline`, as one of its commands, so what the caller queues after it
        (a re-check, a kick) runs once the lease is free, in the same round trip."""
        if not self.held:
            return
        _renewer.forget(self)
        if pipeline is None:
            script(self.redis, _RELEASE)(keys=[self.key], args=[self.token])
        else:
            # EVAL: a registered script would cost the pipeline a SCRIPT EXISTS round trip.
            pipeline.eval(_RELEASE, 1, self.key, self.token)
        self.held = False

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_held(redis: Any, key: str) -> bool:
    return bool(redis.exists(key))


class Renewer:
    """One thread per process renews every lease it holds, all in one round trip per pass."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def track(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.token] = lease
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)
                self._thread.start()

    def forget(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(lease.token, None)

    def renew_all(self) -> list[Lease]:
        """One pass: renew every tracked lease, one round trip per Redis client; returns those lost."""
        with self._lock:
            leases = list(self._leases.values())
        by_client: dict[int, list[Lease]] = {}
        for lease in leases:
            by_client.setdefault(id(lease.redis), []).append(lease)
        lost: list[Lease] = []
        for group in by_client.values():
            lost.extend(self._renew_group(group))
        return lost

    def _renew_group(self, leases: list[Lease]) -> list[Lease]:
        client = leases[0].redis
        try:
            positions = script(client, _RENEW_ALL)(
                keys=[lease.key for lease in leases],
                args=[int(LEASE_SECONDS * 1000), *(lease.token for lease in leases)],
            )
        except Exception:  # noqa: BLE001 - a Redis blip must not kill the renewer
            log.warning("lease.renew_failed", leases=len(leases), exc_info=True)
            return []
        return self._report_lost([leases[position - 1] for position in positions])

    def _report_lost(self, candidates: list[Lease]) -> list[Lease]:
        # A lease released during the pass is gone from Redis without having been lost.
        with self._lock:
            lost = [lease for lease in candidates if self._leases.pop(lease.token, None) is not None]
        for lease in lost:
            lease.lost = True
            log.warning("lease.lost", key=lease.key)
        return lost

    def _run(self) -> None:
        next_pass = time.monotonic() + RENEW_EVERY
        while True:
            time.sleep(max(0.0, next_pass - time.monotonic()))
            # From this pass's start, so a slow pass does not push the next one later.
            next_pass = time.monotonic() + RENEW_EVERY
            self.renew_all()


_renewer = Renewer()
