"""Twilio carrying SMS between numbers it hosts: what a bot sends to a number of a Messaging
Service arrives at that service's webhook, as a test relays it from the stand-in's record."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from cli.twilio_standin import SentMessage, TwilioStandin


@contextmanager
def carrying(twilio: TwilioStandin, services: Mapping[str, str],
             deliver: Callable[[SentMessage, str], object]) -> Iterator[None]:
    """While the block runs, each message sent to a number of `services` (number -> service SID) is
    handed to `deliver` with that SID, in the order sent, from a thread of its own."""
    stop = threading.Event()

    def carry() -> None:
        carried = 0
        while not stop.is_set():
            for message in twilio.messages[carried:]:
                if message.to in services:
                    deliver(message, services[message.to])
                carried += 1
            time.sleep(0.05)

    carrier = threading.Thread(target=carry, daemon=True)
    carrier.start()
    try:
        yield
    finally:
        stop.set()
        carrier.join(5)
