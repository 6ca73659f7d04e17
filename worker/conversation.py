"""Conversations: each (bot, sender) inbox drained in order, one message at a time, by whichever
worker holds the conversation's lease; every engine answer joins the outbox in one atomic step,
and the first reply of an idle outbox is sent from the same thread (worker.outbound.deliver_now).

A message moves inbox -> processing (LMOVE) before the engine sees it, and leaves processing in
the same Redis step that queues its replies, so a worker killed anywhere in between loses nothing,
and a message whose replies were queued is never handed to the engine again. That same step hands
the message log its record of the exchange (worker.logdrain writes it to the database); reply ids
come from the inbound's, so a message handled again rewrites the same rows.
"""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import structlog

from shared import keys, optout
from shared.bots import Bot, Limits
from shared.conversations import (
    FENCED, capped, inbound_from, queue_replies, replies_from,
)
from shared.logging import get_logger
from shared.metrics import TALLY
from shared.redis import script
from shared.tasks import CONVERSATIONS_QUEUE, HANDLE_CONVERSATION, kick_conversation
from worker.deps import get_bots, get_engine, get_redis, get_settings
from worker.engine import Answer, engine_for
from worker.slots import ENGINE_SLOTS
from worker.locks import LEASE_SECONDS, RENEW_EVERY, Lease
from worker.logdrain import exchange_record
from worker.outbound import deliver_now, deliver_taken, queue_and_take

log = get_logger(__name__)

# One actor run handles at most this much, then re-kicks: other conversations get their turn,
# and no run nears the TimeLimit.
MAX_MESSAGES_PER_RUN = 20
MAX_SECONDS_PER_RUN = 60.0


class LeaseLost(Exception):
    """Another worker took the conversation over (ours lapsed): stop without queuing anything."""


class EngineBusy(Exception):
    """The bot has max-concurrent-engine-calls in flight in this process: come back shortly."""


# A conversation whose bot's engine calls are all in use looks again after this long; meanwhile
# its thread serves other bots' conversations.
ENGINE_BUSY_RETRY_MS = 250


@dramatiq.actor(
    actor_name=HANDLE_CONVERSATION, queue_name=CONVERSATIONS_QUEUE,
    max_retries=20, min_backoff=500, max_backoff=30_000, time_limit=5 * 60_000,
)
def handle_conversation(conversation: str) -> None:
    """Drain the conversation's inbox; harmless when another worker is already draining it."""
    drain(get_redis(), conversation)


def drain(redis: Any, conversation: str) -> None:
    lease = Lease(redis, keys.conversation_lock(conversation))
    finished, delay_ms = True, None
    try:
        finished = _drain(redis, conversation, lease)
    except LeaseLost:
        log.warning("conversation.lease_lost", **who(conversation))
    except EngineBusy:
        # The message stays at the head of the processing list, where the next run finds it first.
        finished, delay_ms = False, ENGINE_BUSY_RETRY_MS
    except BaseException:
        lease.release()
        raise
    if not lease.held:
        return  # another worker holds it, and looks again before it lets go
    # A message that arrived while we held the lease had its kick refused: pick it up now.
    if _release_and_look(redis, conversation, lease) or not finished:
        kick_conversation(conversation, delay_ms=delay_ms)


# KEYS: the lease, inbox, processing, outbox, pending. ARGV: the lease's token, conversation.
# Let the lease go, count what waits, and with nothing left anywhere leave the pending set.
_LET_GO_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
local waiting = redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3])
if waiting == 0 and redis.call('LLEN', KEYS[4]) == 0 then redis.call('ZREM', KEYS[5], ARGV[2]) end
return waiting
"""


def _release_and_look(redis: Any, conversation: str, lease: Lease) -> bool:
    """Let the conversation go and say whether messages wait, in one step; with nothing left to
    do it also leaves the pending set."""
    lease.forget()
    return bool(script(redis, _LET_GO_LUA)(
        keys=[lease.key, keys.inbox(conversation), keys.processing(conversation), keys.outbox(conversation),
              keys.PENDING],
        args=[lease.token, conversation],
    ))


def who(conversation: str) -> dict[str, Any]:
    """A conversation as log fields: the sender under a name the log masks."""
    bot_id, sender = keys.split_conversation_id(conversation)
    return {"bot_id": bot_id, "sender": sender}


def _drain(redis: Any, conversation: str, lease: Lease) -> bool:
    """Take the lease and handle messages until the inbox is empty (True; also when another
    worker holds the lease) or this run's share is used up (False)."""
    stop_at = time.monotonic() + MAX_SECONDS_PER_RUN
    for _ in range(MAX_MESSAGES_PER_RUN):
        found = _next_inbound(redis, conversation, lease)
        if found is None:
            return True
        if not handle_message(redis, conversation, *found, lease):
            return True  # nothing was waiting: the look after letting go is the only one needed
        if time.monotonic() > stop_at:
            break
    return False


# KEYS: inbox, processing, lease, the person's replies this minute. ARGV: the lease's token, its
# ms when this run has yet to take it ('' when it holds it). Takes the lease (or checks it is still
# ours), then a crashed worker's message first, else the oldest waiting one, with the replies the
# person got this minute: {raw, replies}. 0 when the lease is another's; {false} with no message.
_NEXT_LUA = """
if ARGV[2] ~= '' then
  if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
elseif redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return 0
end
local raw = redis.call('LINDEX', KEYS[2], 0) or redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
if not raw then return {false} end
return {raw, redis.call('GET', KEYS[4]) or '0'}
"""


def _next_inbound(redis: Any, conversation: str, lease: Lease) -> tuple[str, Bot | None, int] | None:
    """The next message, the conversation's bot as it is now and the replies the person got this
    minute, or None when there is none (or the lease is not ours); the first look also takes the
    lease. One round trip each."""
    first = not lease.held
    found = script(redis, _NEXT_LUA)(
        keys=[keys.inbox(conversation), keys.processing(conversation), lease.key,
              keys.replies_this_minute(conversation)],
        args=[lease.token, int(LEASE_SECONDS * 1000) if first else ""])
    if first and not lease.granted(found != 0):
        return None
    if not found or not found[0]:
        return None
    raw, replied = found
    return raw, get_bots().by_id(keys.split_conversation_id(conversation)[0]), int(replied)


def handle_message(redis: Any, conversation: str, raw: str, bot: Bot | None, replied: int, lease: Lease) -> bool:
    """Ask the bot's engine, log the message with its replies, queue the replies (finishing the
    message) and send the first one from this thread; the rest follow it through the outbound queue. Returns
    whether more messages may be waiting."""
    message = inbound_from(raw)
    # Every event of this hop (engine, send) carries the message, its bot and its conversation.
    with structlog.contextvars.bound_contextvars(message_sid=message["sid"], bot_id=message["bot_id"],
                                                 conversation=conversation):
        return _handle(redis, conversation, raw, message, bot, replied, lease)


def _handle(redis: Any, conversation: str, raw: str, message: dict[str, Any], bot: Bot | None, replied: int,
            lease: Lease) -> bool:
    optout.record_inbound(get_engine(), message)  # a STOP or START, durably (the webhook told the Redis copy)
    if bot is None:
        log.warning("conversation.bot_gone", bot_id=message["bot_id"], message_sid=message["sid"])
        return _unanswered(redis, conversation, raw, message, lease, None)
    if get_bots().is_bot_number(message["sender"]):
        # Another bot of this service: answering would start a loop that never ends.
        log.warning("conversation.from_bot", bot_id=bot.id, message_sid=message["sid"])
        TALLY.incr("sms_unanswered", reason="from_bot")
        return _unanswered(redis, conversation, raw, message, lease, bot.number)
    if bot.limits.max_replies_per_minute and replied >= bot.limits.max_replies_per_minute:
        # A loop with an auto-responder elsewhere, or a flood: the engine is not asked until the minute is over.
        log.warning("conversation.rate_limited", bot_id=bot.id, message_sid=message["sid"], replies_this_minute=replied,
                    max_replies_per_minute=bot.limits.max_replies_per_minute)
        TALLY.incr("sms_unanswered", reason="rate_limited")
        return _unanswered(redis, conversation, raw, message, lease, bot.number)
    started = time.monotonic()
    with ENGINE_SLOTS.taken(bot) as taken:
        if not taken:
            log.info("conversation.engine_busy", bot_id=bot.id, message_sid=message["sid"],
                     in_flight=ENGINE_SLOTS.in_flight(bot.id))
            raise EngineBusy(bot.id)
        answers = engine_for(bot, get_settings()).answer(bot, message)
    replies = _replies(conversation, message, answers, bot.limits)
    # After a long engine call the lease may have lapsed and passed on: then the new holder answers.
    if time.monotonic() - started > RENEW_EVERY and not lease.renew():
        raise LeaseLost(conversation)
    # The log's record of this exchange goes with the replies, in their one Redis step (worker.logdrain).
    queued = queue_and_take(redis, conversation, replies, bot, done_inbound=raw, lease_token=lease.token,
                            log_record=exchange_record(message, replies, bot.number))
    if queued.fenced:  # our lease lapsed (a pause) and another worker took over: it answers
        raise LeaseLost(conversation)
    log.info("conversation.answered", bot_id=bot.id, message_sid=message["sid"], replies=len(replies))
    # The outbox was idle: nobody else will send the first reply. Sending it here, rather than
    # through a send_reply message, spares a Dramatiq message per reply; the outbox lease,
    # pacing and opt-out checks are the same (taken in the queuing step), and a crash leaves it
    # to the sweeper.
    if queued.lease is not None:
        deliver_taken(conversation, replies[0], bot, queued)
    elif queued.head:
        deliver_now(conversation, queued.head)  # the outbox lease was busy: bounce it to its holder
    return queued.waiting


def _unanswered(redis: Any, conversation: str, raw: str, message: dict[str, Any], lease: Lease,
                bot_number: str | None) -> bool:
    """Finish the message without asking the engine; the log keeps it, with no replies."""
    fenced = queue_replies(redis, conversation, [], done_inbound=raw, lease_token=lease.token,
                           log_record=exchange_record(message, [], bot_number))
    if fenced == FENCED:
        raise LeaseLost(conversation)
    return True


def _replies(conversation: str, message: dict[str, Any], answers: list[Answer], limits: Limits) -> list[dict[str, Any]]:
    replies: list[dict[str, Any]] = []
    for answer in answers:
        if len(replies) > limits.max_replies:
            break  # enough to know the answer is cut: the rest need not be built
        replies += replies_from(conversation, message["sender"], answer.text, answer.image,
                                in_reply_to=message["sid"], received_at=message["received_at"])
    cut = capped(replies, limits.max_replies, limits.max_segments)
    if cut.replies_cut or cut.truncated:
        log.warning("conversation.answer_capped", answer_items=len(answers), replies_sent=len(cut.replies),
                    truncated=cut.truncated, max_replies=limits.max_replies, max_segments=limits.max_segments)
        TALLY.incr("sms_answers_capped")
    replies = cut.replies
    # Named after the inbound: a worker that died after logging them logs the same rows again.
    for n, reply in enumerate(replies):
        reply["id"] = f"{message['sid']}-{n}"
    return replies
