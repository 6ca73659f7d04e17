"""What to do about each answer Twilio gives: one table, consulted by the sender and the status callback."""

from __future__ import annotations

import enum
import random


def N_(text: str) -> str:
    """Marks an explanation for the console's message catalogs; the console translates it where it shows it."""
    return text


class Action(enum.Enum):
    RETRY = "retry"  # not processed, or unknown: send again after a backoff
    RETRY_SLOWLY = "retry-slowly"  # the sender's queue at Twilio is full: back off harder
    OPTED_OUT = "opted-out"  # the recipient texted STOP: never retry, remember it
    PERMANENT = "permanent"  # retrying cannot help: record it and dead-letter it


# Twilio error code -> action. Source: ../shared/reference/twilio.md and Twilio's error dictionary.
BY_CODE: dict[int, Action] = {
    20429: Action.RETRY,  # too many concurrent requests
    21611: Action.RETRY_SLOWLY,  # sender queue full
    30001: Action.RETRY_SLOWLY,  # queue overflow
    21610: Action.OPTED_OUT,  # recipient unsubscribed (STOP)
    20003: Action.PERMANENT,  # bad credentials
    21211: Action.PERMANENT,  # invalid To
    21408: Action.PERMANENT,  # region not enabled
    21608: Action.PERMANENT,  # trial accounts may only text verified numbers
    21612: Action.PERMANENT,  # To/From pair unroutable
    21614: Action.PERMANENT,  # not a mobile number
    21617: Action.PERMANENT,  # body too long (we split before sending; this would be our bug)
    30036: Action.PERMANENT,  # validity period expired: it waited in Twilio's queue past the bot's validity-period
}

# Friendly explanations for the operator, where Twilio's message alone is not enough.
HINTS: dict[int, str] = {
    20003: N_("the bot's Twilio account SID or auth token is wrong: update the bot"),
    21608: N_("a Twilio trial account can only text verified numbers: verify the recipient or upgrade"),
    21610: N_("the recipient replied STOP; they must text START before the bot can reach them"),
    21211: N_("the recipient's number is not a valid phone number"),
    21408: N_("the bot's Twilio account may not text this country: enable it in Messaging Geographic Permissions"),
    21611: N_("the bot's number has over 10 hours of messages queued at Twilio: lower its messages-per-second"),
    21612: N_("Twilio cannot route messages between the bot's number and this recipient"),
    21614: N_("the recipient's number is not a mobile number"),
    30001: N_("the bot's sender (number or messaging service) has over 10 hours of messages queued at Twilio: "
              "lower its messages-per-second to what its number or A2P 10DLC campaign may send"),
    30036: N_("the message waited in Twilio's queue longer than the bot's validity-period and was not sent: "
              "raise validity-period, or lower messages-per-second"),
}

# Final statuses a status callback can bring without an error code that explains them.
STATUS_HINTS: dict[str, str] = {
    "canceled": N_("the message was canceled before Twilio sent it "
                   "(a scheduled message canceled in the console or API)"),
}

# (first delay, longest delay) in seconds; each retry doubles, times a random 1-2 (jitter).
BACKOFF: dict[Action, tuple[float, float]] = {
    Action.RETRY: (1.0, 300.0),
    Action.RETRY_SLOWLY: (10.0, 900.0),
}


def backoff(action: Action, attempts: int) -> float:
    """Seconds before retry number `attempts` (1 for the first): exponential, with jitter."""
    first, longest = BACKOFF[action]
    return min(first * 2 ** (attempts - 1), longest) * random.uniform(1.0, 2.0)


def action_for(http_status: int | None, code: int | None) -> Action:
    """Decide from the Twilio code when there is one, else from the HTTP status."""
    if code is not None and code in BY_CODE:
        return BY_CODE[code]
    if http_status is None or http_status == 429 or http_status >= 500:
        return Action.RETRY  # timeouts and connection errors arrive with no status at all
    return Action.PERMANENT
