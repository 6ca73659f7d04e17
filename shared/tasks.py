"""The Dramatiq broker, queue and actor names, and the messages that set the workers going.

The webhook enqueues work by actor name here, so it never imports the worker package.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis

from shared.redis import loaded_or_rerun, queue_script
from shared.settings import get_settings

CONVERSATIONS_QUEUE = "conversations"
OUTBOUND_QUEUE = "outbound"
HANDLE_CONVERSATION = "handle_conversation"
SEND_REPLY = "send_reply"

# A killed worker's messages come back after the heartbeat timeout, in a maintenance pass;
# dramatiq's defaults (60 s, 0.1% of calls) take minutes, this takes ~20 s.
HEARTBEAT_TIMEOUT_MS = 15_000
MAINTENANCE_CHANCE = 20_000  # per million broker calls

_broker: RedisBroker | None = None
_lock = threading.Lock()


def make_broker(redis_url: str) -> RedisBroker:
    options: dict[str, object] = {}
    if redis_url.startswith("rediss://") and "ssl_cert_reqs" not in redis_url:
        options["ssl_cert_reqs"] = None
    broker = RedisBroker(
        url=redis_url,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=MAINTENANCE_CHANCE,
        **options,
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


def kick_conversation(conversation: str, broker: dramatiq.Broker | None = None) -> None:
    """Ask a worker to drain this conversation's inbox (harmless if one already is)."""
    (broker or get_broker()).enqueue(conversation_kick(conversation))


def enqueue_in(pipeline: Any, message: dramatiq.Message, broker: RedisBroker) -> Callable[[Any], Any]:
    """Queue `message` as one more command of the caller's Redis pipeline.

    RedisBroker.enqueue costs a round trip of its own; this runs the broker's own dispatch script
    (same arguments as RedisBroker._dispatch, dramatiq 2.x) in the caller's pipeline, so the
    webhook stores a message and wakes a worker in one round trip.
    Returns the check to apply to this command's result once the pipeline has run.
    """
    message = message.copy(options={"redis_message_id": str(uuid.uuid4())})
    broker.emit_before("enqueue", message, None)
    queue_script(pipeline, broker.scripts["dispatch"], [broker.namespace], [
        "enqueue", current_millis(), message.queue_name, broker.broker_id, broker.heartbeat_timeout,
        broker.dead_message_ttl, 0, broker._max_unpack_size(),
        message.options["redis_message_id"], message.encode(),
    ])
    return lambda result: loaded_or_rerun(result, lambda: broker.enqueue(message))


def kick_delivery(conversation: str, reply_id: str, delay_ms: int | None = None,
                  broker: dramatiq.Broker | None = None) -> None:
    """Ask a worker to send `reply_id` if it is at the head of the conversation's outbox."""
    message = dramatiq.Message(
        queue_name=OUTBOUND_QUEUE, actor_name=SEND_REPLY, args=(conversation, reply_id), kwargs={}, options={},
    )
    (broker or get_broker()).enqueue(message, delay=delay_ms)
