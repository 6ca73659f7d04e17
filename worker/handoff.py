"""Forwarding a handed-off conversation's messages to the bot's handoff-url, for a human to see.

Each message is POSTed as JSON, signed as Stripe and Slack sign theirs: `X-Mammut-Signature:
t=<unix time>,v1=<hex HMAC-SHA256 of "<t>." + the exact body under the bot's handoff-secret>`, with
a second v1 under the previous secret for a day after a rotation. The receiver checks it (and that t
is recent) as the README shows, so a captured forward cannot be replayed later. A forward is retried like an engine call (short backoff inside a deadline), reaches only
addresses a bot's engine may (shared.netguard), follows no redirect and reads at most a few KiB of
answer. One that still fails for a reason that may pass (the handoff-url down, timing out, a 5xx)
is handed to the `forward_handoff` actor, which tries again in the background with backoff from
30 s to 30 min for about five hours (a Dramatiq message: it survives restarts, and ends in the
dead-letter queue, `mammut-sms dlq`, if it never succeeds), to the bot's handoff-url and secret
as they are then. The message is in the conversation log whatever happens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import dramatiq

from shared import keys
from shared.bots import Bot
from shared.erasure import erased_since
from shared.handoff import Handoff
from shared.logging import get_logger
from shared.metrics import TALLY
from shared.netguard import AddressPolicy
from shared.settings import Settings
from shared.tasks import FORWARD_HANDOFF, OUTBOUND_QUEUE, get_broker
from worker.deps import get_bots, get_redis, get_settings
from worker.engine import EngineError, HttpEngine, media_of
from worker.slots import ENGINE_SLOTS

log = get_logger(__name__)

SIGNATURE_HEADER = "X-Mammut-Signature"
MAX_ANSWER_BYTES = 16 * 1024  # the answer is not read: only whether it was a 2xx
# Background tries of a forward that failed inline: Dramatiq's backoff doubles from 30 s and is
# capped at 30 min, so 14 tries span about five hours.
LATER_RETRIES, LATER_MIN_BACKOFF_MS, LATER_MAX_BACKOFF_MS = 14, 30_000, 30 * 60_000
# The first background try waits this long: the inline tries just spent their deadline failing.
LATER_FIRST_DELAY_MS = 30_000
# A background try that finds the bot's slots all in use looks again after this long.
BUSY_RETRY_MS = 1_000


def signature(secrets: list[str], body: bytes, now: int) -> str:
    """The X-Mammut-Signature of `body` sent at `now` (Unix seconds), one v1 per secret."""
    signed = f"{now}.".encode() + body
    return ",".join([f"t={now}", *(f"v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"
                                   for secret in secrets)])


def forward_payload(bot: Bot, message: Mapping[str, Any], handoff: Handoff) -> dict[str, Any]:
    """What the human's tool is sent of one message (several, when a burst was merged)."""
    return {
        "bot_id": bot.id,
        "person": message["sender"],
        "to": message["to"],
        "text": message.get("body") or "",
        "media": media_of(message),
        "message_sid": message["sid"],
        "message_sids": message.get("message_sids") or [message["sid"]],
        "time": message["received_at"],
        "handoff": handoff.public(),
    }


class Forwarder(HttpEngine):
    """A bot's handoff-url, reached like the bot's own engine."""

    METRIC, EVENT = "sms_handoff_forwards", "handoff_forward"
    # A receiver refusing the signature (401, 403: it has not switched to a rotated secret yet, or its
    # clock is off) or asking for time (408, 425, 429) may take the forward later: tried again in the
    # background, never dropped. Any other 4xx is a refusal of the forward itself.
    LATER_STATUSES = frozenset({401, 403, 408, 425, 429})

    def forward(self, bot: Bot, message: Mapping[str, Any], handoff: Handoff) -> bool:
        """Whether the handoff-url took the message (a 2xx) within the retries; if not, and trying
        again later may help, it is queued for forward_later."""
        payload = forward_payload(bot, message, handoff)
        taken, may_pass = self.post(bot, payload)
        if taken:
            return True
        if may_pass:
            forward_later.send_with_options(args=(bot.id, payload), delay=LATER_FIRST_DELAY_MS)
            log.warning("handoff_forward.queued", bot_id=bot.id, message_sid=message["sid"])
            TALLY.incr(self.METRIC, outcome="queued")
        else:
            log.error("handoff_forward.gave_up", bot_id=bot.id, message_sid=message["sid"])
            TALLY.incr(self.METRIC, outcome="gave_up")
        return False

    def post(self, bot: Bot, payload: Mapping[str, Any]) -> tuple[bool, bool]:
        """POST `payload`, signed with the bot's secret, within the retries: whether it was taken,
        and if not, whether the last failure may pass (a timeout, a 5xx; not a refused address)."""
        data = json.dumps(payload, separators=(",", ":")).encode()

        def attempt(deadline: float) -> bool:
            # Signed at each try: its time is when it was sent.
            now = time.time()
            headers = {SIGNATURE_HEADER: signature(bot.handoff_signing_secrets(now), data, int(now))}
            return self._call(data, headers, deadline, _ignored)

        outcome = self._retried(bot, attempt)
        if isinstance(outcome, EngineError):
            return False, outcome.retryable
        return True, False


def _ignored(body: bytes) -> bool:
    return True


def forwarder(bot: Bot, settings: Settings) -> Forwarder:
    """The bot's handoff-url as a Forwarder (the bot must have one)."""
    assert bot.handoff_url
    return Forwarder(bot.handoff_url, policy=AddressPolicy.for_settings(settings), development=settings.development,
                     service_url=settings.public_url, max_bytes=MAX_ANSWER_BYTES)


def forward(bot: Bot, message: Mapping[str, Any], handoff: Handoff, settings: Settings) -> bool:
    """Forward `message` to the bot's handoff-url, if it has one; whether it was taken (now)."""
    if not bot.handoff_url:
        return False
    return forwarder(bot, settings).forward(bot, message, handoff)


class ForwardFailed(dramatiq.Retry):
    """The handoff-url did not take a forward: Dramatiq tries again after its backoff (an expected
    outcome, logged as a retry, without a traceback)."""


@dramatiq.actor(actor_name=FORWARD_HANDOFF, queue_name=OUTBOUND_QUEUE, broker=get_broker(),
                max_retries=LATER_RETRIES, min_backoff=LATER_MIN_BACKOFF_MS, max_backoff=LATER_MAX_BACKOFF_MS)
def forward_later(bot_id: int, payload: dict[str, Any]) -> None:
    """Try a forward again, to the bot's handoff-url and secret as they are now; dropped when the
    bot is gone or has no handoff-url any more, or when the failure cannot pass."""
    if _erased_after(bot_id, payload):
        log.info("handoff_forward.dropped", bot_id=bot_id, message_sid=payload.get("message_sid"), reason="erased")
        return
    bot = get_bots().by_id(bot_id)
    if bot is None or not bot.handoff_url:
        log.warning("handoff_forward.dropped", bot_id=bot_id, message_sid=payload.get("message_sid"),
                    reason="bot deleted" if bot is None else "no handoff-url")
        return
    with ENGINE_SLOTS.taken(bot) as slot:
        if not slot:
            # The bot's slots are all in use (its engine or other forwards): not a try, so no retry is spent.
            forward_later.send_with_options(args=(bot_id, payload), delay=BUSY_RETRY_MS)
            return
        taken, may_pass = forwarder(bot, get_settings()).post(bot, payload)
    if taken:
        log.info("handoff_forward.delivered_later", bot_id=bot_id, message_sid=payload.get("message_sid"))
        return
    if not may_pass:
        log.error("handoff_forward.gave_up", bot_id=bot_id, message_sid=payload.get("message_sid"))
        TALLY.incr(Forwarder.METRIC, outcome="gave_up")
        return
    log.warning("handoff_forward.failed_again", bot_id=bot_id, message_sid=payload.get("message_sid"))
    raise ForwardFailed(f"the handoff-url did not take {payload.get('message_sid')}")


def _erased_after(bot_id: int, payload: Mapping[str, Any]) -> bool:
    """Whether the person's conversation was erased after the forwarded text came (shared.erasure)."""
    conversation = keys.conversation_id(bot_id, str(payload.get("person")))
    erased = erased_since(get_redis(), [conversation]).get(conversation)
    return erased is not None and float(payload.get("time") or 0) <= erased
