"""Single-flight loads: one load per key at a time in a process; whoever asks meanwhile gets its result.

A thousand greenlets (or hundreds of threads) finding the same cache entry expired would otherwise
each query the database through a pool of ten, and those left waiting for a connection fail.
threading's Lock and Event become gevent's under dramatiq-gevent's monkey-patching.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any


class _Flight:
    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class SingleFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight] = {}

    def run(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """`load()`'s result (or its exception): this caller's own load, or the one already under way for `key`."""
        flight, leads = self._join(key)
        if leads:
            self._fly(key, flight, load)
        else:
            flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value

    def start(self, key: Hashable, load: Callable[[], Any]) -> bool:
        """Load `key` now unless a load of it is under way (then return at once); whether this one ran."""
        flight, leads = self._join(key)
        if leads:
            self._fly(key, flight, load)
        return leads

    def _join(self, key: Hashable) -> tuple[_Flight, bool]:
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = self._flights[key] = _Flight()
            return flight, True

    def _fly(self, key: Hashable, flight: _Flight, load: Callable[[], Any]) -> None:
        try:
            flight.value = load()
        except Exception as error:  # noqa: BLE001 - handed to every caller waiting on it
            flight.error = error
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
