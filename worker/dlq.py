"""The outbound dead-letter queue: replies that failed for good, shown and resent on request.

Dramatiq keeps a dead message in a sorted set `<namespace>:<queue>.XQ` (scored by when it died, in
milliseconds) and its body in the hash `<namespace>:<queue>.XQ.msgs` (see dramatiq's
brokers/redis/dispatch.lua). The message only names the conversation and the reply; what the reply
said and why it failed is kept beside it, at `keys.dead_reply`, for as long as Dramatiq keeps it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import dramatiq

from shared import keys
from shared.conversations import new_reply, queue_replies
from shared.logging import get_logger
from shared.tasks import OUTBOUND_QUEUE, kick_delivery

log = get_logger(__name__)


def _xq(broker: Any) -> tuple[str, str]:
    name = f"{broker.namespace}:{OUTBOUND_QUEUE}.XQ"
    return name, name + ".msgs"


def list_dead_letters(redis: Any, broker: Any) -> list[dict[str, Any]]:
    """Every dead-lettered outbound message, oldest first, with the reply it was sending."""
    queue, bodies = _xq(broker)
    scored = redis.zrange(queue, 0, -1, withscores=True)
    if not scored:
        return []
    raw_messages = redis.hmget(bodies, [message_id for message_id, _ in scored])
    entries = []
    for (message_id, died_ms), raw in zip(scored, raw_messages):
        if raw is None:
            continue  # expired between the two reads
        entries.append(_entry(redis, message_id, died_ms, raw))
    return entries


def _entry(redis: Any, message_id: str, died_ms: float, raw: str | bytes) -> dict[str, Any]:
    message = dramatiq.Message.decode(raw if isinstance(raw, bytes) else raw.encode("utf-8"))
    conversation, reply_id = message.args[0], message.args[1]
    dead_raw = redis.get(keys.dead_reply(reply_id))
    # Without a dead copy the message died of an unexpected error, its reply still on the outbox.
    queued_raw = None if dead_raw else redis.hget(keys.replies(conversation), reply_id)
    reply = json.loads(dead_raw or queued_raw or "{}")
    bot_id, to = keys.split_conversation_id(conversation)
    return {
        "id": message_id,
        "reply_id": reply_id,
        "conversation": conversation,
        "bot_id": bot_id,
        "to": reply.get("to", to),
        "text": reply.get("text"),
        "media_url": reply.get("media_url"),
        "error_code": reply.get("error_code"),
        "error": reply.get("error") or _last_line(message.options.get("traceback")),
        "reason": reply.get("reason", "unexpected"),
        "attempts": reply.get("attempts", message.options.get("retries", 0)),
        "failed_at": reply.get("failed_at", died_ms / 1000),
        "still_queued": queued_raw is not None,
    }


def _last_line(traceback: str | None) -> str | None:
    return traceback.strip().splitlines()[-1] if traceback else None


def replay(redis: Any, broker: Any, ids: Iterable[str] | None = None) -> list[str]:
    """Queue each dead reply again (all, or those whose message or reply id is in `ids`) and take
    it off the dead-letter queue; returns the message ids replayed."""
    wanted = set(ids) if ids is not None else None
    replayed = []
    for entry in list_dead_letters(redis, broker):
        if wanted is not None and not wanted & {entry["id"], entry["reply_id"]}:
            continue
        _requeue(redis, broker, entry)
        queue, bodies = _xq(broker)
        redis.zrem(queue, entry["id"])
        redis.hdel(bodies, entry["id"])
        redis.delete(keys.dead_reply(entry["reply_id"]))
        replayed.append(entry["id"])
    return replayed


def _requeue(redis: Any, broker: Any, entry: dict[str, Any]) -> None:
    conversation = entry["conversation"]
    if entry["still_queued"]:
        # The reply never left its outbox (an unexpected error): kick it where it stands.
        kick_delivery(conversation, entry["reply_id"], broker=broker)
        log.info("dlq.rekicked", conversation=conversation, reply_id=entry["reply_id"])
        return
    if entry["text"] is None:
        log.warning("dlq.unknown_reply", conversation=conversation, reply_id=entry["reply_id"])
        return  # neither kept nor queued (its 7 days ran out): nothing left to resend
    reply = new_reply(conversation, entry["to"], entry["text"], entry["media_url"])
    kick = queue_replies(redis, conversation, [reply])
    if kick is not None:
        kick_delivery(conversation, kick, broker=broker)
    log.info("dlq.replayed", conversation=conversation, reply_id=reply["id"], replay_of=entry["reply_id"])
