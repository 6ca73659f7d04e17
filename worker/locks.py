"""Leases: Redis locks with a short expiry that this process renews while it holds them.

A worker killed mid-message stops renewing, so its lease lapses within LEASE_SECONDS and
another worker can take the conversation over; a live holder never loses it to slowness.
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


class Lease:
    """One held lock; use as a context manager after a successful `acquire`."""

    def __init__(self, redis: Any, key: str) -> None:
        self.redis = redis
        self.key = key
        self.token = uuid.uuid4().hex
        self.held = False

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


class _Renewer:
    """One thread per process renews every lease it holds."""

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

    def _run(self) -> None:
        while True:
            time.sleep(RENEW_EVERY)
            with self._lock:
                leases = list(self._leases.values())
            for lease in leases:
                try:
                    if not lease.renew():
                        log.warning("lease.lost", key=lease.key)
                except Exception:  # noqa: BLE001 - a Redis blip must not kill the renewer
                    log.warning("lease.renew_failed", key=lease.key, exc_info=True)


_renewer = _Renewer()
