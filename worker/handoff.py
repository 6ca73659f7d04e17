"""Forwarding a handed-off conversation's messages to the bot's handoff-url, for a human to see.

Each message is POSTed as JSON, signed with an HMAC-SHA256 of the exact body under the bot's
handoff-secret, hex, in `X-Mammut-Signature: sha256=<hex>`. The receiver checks it as the README
shows. A forward is retried like an engine call (short backoff inside a deadline), reaches only
addresses a bot's engine may (shared.netguard), follows no redirect and reads at most a few KiB of
answer. One that still fails is logged and counted: the message stays in the conversation log,
where the human's tool can read it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from shared.bots import Bot
from shared.handoff import Handoff
from shared.logging import get_logger
from shared.metrics import TALLY
from shared.netguard import AddressPolicy
from shared.settings import Settings
from worker.engine import HttpEngine, media_of

log = get_logger(__name__)

SIGNATURE_HEADER = "X-Mammut-Signature"
MAX_ANSWER_BYTES = 16 * 1024  # the answer is not read: only whether it was a 2xx


def signature(secret: str, body: bytes) -> str:
    """The X-Mammut-Signature of `body` under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


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

    def forward(self, bot: Bot, message: Mapping[str, Any], handoff: Handoff) -> bool:
        """Whether the handoff-url took the message (a 2xx), within the retries."""
        data = json.dumps(forward_payload(bot, message, handoff), separators=(",", ":")).encode()
        headers = {SIGNATURE_HEADER: signature(bot.handoff_secret or "", data)}
        taken = self._retried(bot, lambda deadline: self._call(data, headers, deadline, _ignored))
        if taken is None:
            log.error("handoff_forward.gave_up", bot_id=bot.id, message_sid=message["sid"])
            TALLY.incr(self.METRIC, outcome="gave_up")
            return False
        return True


def _ignored(body: bytes) -> bool:
    return True


def forward(bot: Bot, message: Mapping[str, Any], handoff: Handoff, settings: Settings) -> bool:
    """Forward `message` to the bot's handoff-url, if it has one; whether it was taken."""
    if not bot.handoff_url:
        return False
    return Forwarder(bot.handoff_url, policy=AddressPolicy.for_settings(settings), development=settings.development,
                     service_url=settings.public_url, max_bytes=MAX_ANSWER_BYTES).forward(bot, message, handoff)
