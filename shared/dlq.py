"""The outbound dead letters: replies that failed for good, listed and resent on request (by the
console and REST API in the web process, and by `mammut-sms dlq`).

A reply Twilio refused for good (or that ran out of retries) is a row of the database's
`dead_letters` (shared.deadletters), listed under its reply id. A send that died of an unexpected
error (a bug, an outage) after Dramatiq's retries is in Dramatiq's own dead-letter queue: a sorted
set `<namespace>:<queue>.XQ` (scored by when it died, in milliseconds) with bodies in
`<namespace>:<queue>.XQ.msgs` (see dramatiq's brokers/redis/dispatch.lua); its reply is normally
still on its outbox. Both are listed, oldest first, under the same fields. So are the queue's other
dead messages (a handoff forward that never got through, a resend), under their actor's name;
replaying one sends it again as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import dramatiq
from sqlalchemy import Engine

from shared import deadletters, keys, messagelog
from shared.conversations import new_reply, queue_replies
from shared.db import get_engine, transaction
from shared.logging import get_logger
from shared.settings import get_settings
from shared.tasks import FORWARD_HANDOFF, OUTBOUND_QUEUE, RESEND_REPLY, SEND_REPLY, kick_delivery

log = get_logger(__name__)

DATABASE, DRAMATIQ = "database", "dramatiq"
# Why a send_reply message is in Dramatiq's dead-letter queue (other actors' show their own name).
UNEXPECTED = "unexpected"


def _engine(engine: Engine | None) -> Engine:
    return engine if engine is not None else get_engine(get_settings().checked())


def _xq(broker: Any) -> tuple[str, str]:
    name = f"{broker.namespace}:{OUTBOUND_QUEUE}.XQ"
    return name, name + ".msgs"


def list_dead_letters(redis: Any, broker: Any, engine: Engine | None = None) -> list[dict[str, Any]]:
    """Every dead reply, oldest first: the database's, and the messages Dramatiq dead-lettered."""
    with _engine(engine).connect() as connection:
        kept = [_from_row(row) for row in deadletters.list_all(connection)]
    # Earlier releases dead-lettered a permanent failure in Dramatiq too; once `migrate --from-redis`
    # copied it, its row says everything (and Dramatiq drops the message within 7 days).
    copied = {entry["reply_id"] for entry in kept}
    stuck = [entry for entry in _from_dramatiq(redis, broker) if entry["reply_id"] not in copied]
    return sorted(kept + stuck, key=lambda entry: entry["failed_at"])


def _from_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "reply_id": row["id"], "conversation": keys.conversation_id(row["bot_id"], row["person"]),
        "bot_id": row["bot_id"], "to": row["person"], "text": row["text"], "media_url": row["media_url"],
        "error_code": row["error_code"], "http_status": row["http_status"], "error": row["error"],
        "reason": row["reason"], "attempts": row["attempts"], "failed_at": row["failed_at"], "still_queued": False,
        "kept_in": DATABASE,
    }


def _from_dramatiq(redis: Any, broker: Any) -> list[dict[str, Any]]:
    queue, bodies = _xq(broker)
    scored = redis.zrange(queue, 0, -1, withscores=True)
    if not scored:
        return []
    raw_messages = redis.hmget(bodies, [message_id for message_id, _ in scored])
    return [_from_message(redis, message_id, died_ms, raw)
            for (message_id, died_ms), raw in zip(scored, raw_messages)
            if raw is not None]  # None: expired between the two reads


def _from_message(redis: Any, message_id: str, died_ms: float, raw: str | bytes) -> dict[str, Any]:
    message = dramatiq.Message.decode(raw if isinstance(raw, bytes) else raw.encode("utf-8"))
    if message.actor_name != SEND_REPLY:
        return _from_other(message_id, died_ms, message)
    conversation, reply_id = message.args[0], message.args[1]
    queued_raw = redis.hget(keys.replies(conversation), reply_id)
    reply = json.loads(queued_raw or "{}")
    bot_id, to = keys.split_conversation_id(conversation)
    return {
        "id": message_id, "reply_id": reply_id, "conversation": conversation, "bot_id": bot_id,
        "to": reply.get("to", to), "text": reply.get("text"), "media_url": reply.get("media_url"),
        "error_code": reply.get("error_code"), "http_status": None,
        "error": _last_line(message.options.get("traceback")), "reason": UNEXPECTED,
        "attempts": message.options.get("retries", 0), "failed_at": died_ms / 1000,
        "still_queued": queued_raw is not None, "kept_in": DRAMATIQ,
    }


def _from_other(message_id: str, died_ms: float, message: dramatiq.Message) -> dict[str, Any]:
    """Another actor's message on the outbound queue (a 30001 resend, a handoff forward tried in
    the background): listed under its actor's name, replayed by sending it again as it was."""
    args = list(message.args)
    bot_id = args[0] if args and isinstance(args[0], int) else None
    forward = args[1] if message.actor_name == FORWARD_HANDOFF and len(args) > 1 and isinstance(args[1], dict) else {}
    person = forward.get("person")
    return {
        "id": message_id, "reply_id": args[1] if message.actor_name == RESEND_REPLY and len(args) > 1 else None,
        "conversation": keys.conversation_id(bot_id, person) if bot_id is not None and person else None,
        "bot_id": bot_id, "to": person, "text": forward.get("text"), "media_url": None, "error_code": None,
        "http_status": None, "error": _last_line(message.options.get("traceback")), "reason": message.actor_name,
        "attempts": message.options.get("retries", 0), "failed_at": died_ms / 1000, "still_queued": False,
        "kept_in": DRAMATIQ,
    }


def _last_line(traceback: str | None) -> str | None:
    return traceback.strip().splitlines()[-1] if traceback else None


def replay(redis: Any, broker: Any, ids: Iterable[str] | None = None, engine: Engine | None = None) -> list[str]:
    """Queue each dead reply again (all, or those whose id or reply id is in `ids`) and forget it;
    returns the ids replayed. A dead letter replayed twice at once is queued once."""
    engine = _engine(engine)
    wanted = set(ids) if ids is not None else None
    replayed = []
    for entry in list_dead_letters(redis, broker, engine):
        if wanted is not None and not wanted & {entry["id"], entry["reply_id"]}:
            continue
        if entry["kept_in"] == DATABASE:
            if not _replay_kept(engine, redis, broker, entry):
                continue
        elif entry["kept_in"] == DRAMATIQ and entry["reason"] != UNEXPECTED:
            if not _send_again(redis, broker, entry):
                continue
        else:
            _replay_message(engine, redis, broker, entry)
        replayed.append(entry["id"])
    return replayed


def _replay_kept(engine: Engine, redis: Any, broker: Any, entry: dict[str, Any]) -> bool:
    # Taken in the transaction that logs the reply again, and queued before it commits: a replay
    # that fails keeps its dead letter, and of two replays at once only the one that took it queues.
    with transaction(engine) as connection:
        if not deadletters.take(connection, entry["reply_id"]):
            return False
        reply = _again(entry)
        messagelog.record_replies(connection, [reply], None, origin=messagelog.REPLAY)
        _queue(redis, broker, reply, entry)
    return True


def _replay_message(engine: Engine, redis: Any, broker: Any, entry: dict[str, Any]) -> None:
    conversation = entry["conversation"]
    if entry["still_queued"]:
        # The reply never left its outbox: kick it where it stands.
        kick_delivery(conversation, entry["reply_id"], broker=broker)
        log.info("dlq.rekicked", conversation=conversation, reply_id=entry["reply_id"])
    elif entry["text"] is None:
        # Its message died and its reply is gone from the outbox: nothing left to resend.
        log.warning("dlq.unknown_reply", conversation=conversation, reply_id=entry["reply_id"])
    else:
        reply = _again(entry)
        with transaction(engine) as connection:
            messagelog.record_replies(connection, [reply], None, origin=messagelog.REPLAY)
        _queue(redis, broker, reply, entry)
    queue, bodies = _xq(broker)
    redis.zrem(queue, entry["id"])
    redis.hdel(bodies, entry["id"])


def _send_again(redis: Any, broker: Any, entry: dict[str, Any]) -> bool:
    """Another actor's dead message, sent again as it was with its retries reset; taken off the
    dead-letter queue first, so of two replays at once only one sends it."""
    queue, bodies = _xq(broker)
    raw = redis.hget(bodies, entry["id"])
    if raw is None or not redis.zrem(queue, entry["id"]):
        return False
    redis.hdel(bodies, entry["id"])
    dead = dramatiq.Message.decode(raw if isinstance(raw, bytes) else raw.encode("utf-8"))
    broker.enqueue(dramatiq.Message(queue_name=dead.queue_name, actor_name=dead.actor_name, args=dead.args,
                                    kwargs=dead.kwargs, options={}))
    log.info("dlq.sent_again", actor=dead.actor_name, message_id=entry["id"], bot_id=entry["bot_id"])
    return True


def _again(entry: dict[str, Any]) -> dict[str, Any]:
    """A new reply (its own id) with the dead one's text and image."""
    return new_reply(entry["conversation"], entry["to"], entry["text"], entry["media_url"])


def _queue(redis: Any, broker: Any, reply: dict[str, Any], entry: dict[str, Any]) -> None:
    """At the tail of its conversation: a replay never jumps ahead of what is queued."""
    kick = queue_replies(redis, reply["conversation"], [reply])
    if kick is not None:
        kick_delivery(reply["conversation"], kick, broker=broker)
    log.info("dlq.replayed", conversation=reply["conversation"], reply_id=reply["id"], replay_of=entry["reply_id"])
