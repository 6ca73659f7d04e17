"""The Dramatiq broker, queue and actor names, and the messages that set the workers going.

The webhook enqueues work by actor name here, so it never imports the worker package.
"""

from __future__ import annotations

import threading

import dramatiq
import redis as redis_lib

from shared import keys
from shared.redis import blocking_pool
from shared.settings import get_settings
from shared.wakeups import HintedBroker

CONVERSATIONS_QUEUE = "conversations"
OUTBOUND_QUEUE = "outbound"
HANDLE_CONVERSATION = "handle_conversation"
SEND_REPLY = "send_reply"
RESEND_REPLY = "resend_reply"
FORWARD_HANDOFF = "forward_handoff"
# The Redis key prefix of dramatiq's queues (its default, named so the webhook can enqueue in Lua).
NAMESPACE = "dramatiq"

# A killed worker's messages come back after the heartbeat timeout, in a maintenance pass;
# dramatiq's defaults (60 s, 0.1% of calls) take minutes, this takes ~20 s.
HEARTBEAT_TIMEOUT_MS = 15_000
MAINTENANCE_CHANCE = 20_000  # per million broker calls

_broker: HintedBroker | None = None
_lock = threading.Lock()


def make_broker(redis_url: str) -> HintedBroker:
    # Dramatiq's own client (from url=) has redis-py's default pool, which fails past 100
    # connections; it reads bytes, so it cannot share the app's str client.
    # The conversations queue holds wake-ups, kept as the cheap hints they are (shared/wakeups.py).
    broker = HintedBroker(
        hinted_queue=CONVERSATIONS_QUEUE, hints_key=keys.WAKE_UPS,
        client=redis_lib.Redis.from_pool(blocking_pool(redis_url)),
        namespace=NAMESPACE,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=MAINTENANCE_CHANCE,
    )
    broker.declare_queue(CONVERSATIONS_QUEUE)
    broker.declare_queue(OUTBOUND_QUEUE)
    return broker


def get_broker() -> HintedBroker:
    """The process's broker, made on first use and installed as dramatiq's global broker."""
    global _broker
    with _lock:
        if _broker is None:
            _broker = make_broker(get_settings().redis_url)
            dramatiq.set_broker(_broker)
        return _broker


def conversation_kick(conversation: str) -> dramatiq.Message:
    return dramatiq.Message(
        queue_name=CONVERSATIONS_QUEUE, actor_name=HANDLE_CONVERSATION, args=(conversation,), kwargs={}, options={},
    )


def kick_conversation(conversation: str, broker: dramatiq.Broker | None = None, delay_ms: int | None = None) -> None:
    """Ask a worker to drain this conversation's inbox (harmless if one already is)."""
    (broker or get_broker()).enqueue(conversation_kick(conversation), delay=delay_ms)


def waiting_key(queue_name: str) -> str:
    """The Redis list of a queue's waiting messages, whose length is the queue's depth: the
    wake-ups' own list for the conversations queue, else dramatiq's list of message ids (its
    dispatch.lua; the bodies are in a hash beside it)."""
    return keys.WAKE_UPS if queue_name == CONVERSATIONS_QUEUE else f"{NAMESPACE}:{queue_name}"


def kick_delivery(conversation: str, reply_id: str, delay_ms: int | None = None,
                  broker: dramatiq.Broker | None = None) -> None:
    """Ask a worker to send `reply_id` if it is at the head of the conversation's outbox."""
    message = dramatiq.Message(
        queue_name=OUTBOUND_QUEUE, actor_name=SEND_REPLY, args=(conversation, reply_id), kwargs={}, options={},
    )
    (broker or get_broker()).enqueue(message, delay=delay_ms)


def request_resend(broker: dramatiq.Broker, bot_id: int, reply_id: str, from_number: str | None, code: int,
                   delay_ms: int) -> None:
    """Ask a worker to send `reply_id` again in `delay_ms`, as a new reply (a 30001 told by status
    callback, worker.outbound.resend_reply); it reads the reply from the log by then."""
    broker.enqueue(dramatiq.Message(queue_name=OUTBOUND_QUEUE, actor_name=RESEND_REPLY,
                                    args=(bot_id, reply_id, from_number, code), kwargs={}, options={}),
                   delay=delay_ms)
