"""The Dramatiq broker, queue and actor names, and the messages that set the workers going.

The webhook enqueues work by actor name here, so it never imports the worker package.
"""

from __future__ import annotations

import threading

import dramatiq
import redis as redis_lib
from dramatiq.brokers.redis import RedisBroker

from shared.redis import blocking_pool
from shared.settings import get_settings

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

_broker: RedisBroker | None = None
_lock = threading.Lock()


def make_broker(redis_url: str) -> RedisBroker:
    # Dramatiq's own client (from url=) has redis-py's default pool, which fails past 100
    # connections; it reads bytes, so it cannot share the app's str client.
    broker = RedisBroker(
        client=redis_lib.Redis.from_pool(blocking_pool(redis_url)),
        namespace=NAMESPACE,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=MAINTENANCE_CHANCE,
    )
    broker.declare_queue(CONVERSATIONS_QUEUE)
    broker.declare_queue(OUTBOUND_QUEUE)
    return broker


def get_broker() -> RedisBroker:
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


def queue_keys(queue_name: str) -> tuple[str, str]:
    """A queue as dramatiq's Redis broker keeps it (its dispatch.lua): a list of message ids, and a
    hash of id -> encoded message. The webhook's accept script enqueues onto these directly, so a
    message is stored and its worker woken in one Lua step."""
    name = f"{NAMESPACE}:{queue_name}"
    return name, f"{name}.msgs"


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
