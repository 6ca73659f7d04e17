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

import json
import time
from dataclasses import dataclass
from typing import Any

import dramatiq
import structlog

from shared import handoff, keys, optout
from shared.bots import LOADED as REGISTRY_LOADED, Bot, Limits, number_route
from shared.conversations import (
    FENCED, capped, inbound_from, queue_replies, replies_from,
)
from shared.erasure import erased_since
from shared.logging import get_logger
from shared.metrics import TALLY
from shared.poolnumbers import POOL_NUMBERS
from shared.redis import script
from shared.tasks import CONVERSATIONS_QUEUE, HANDLE_CONVERSATION, kick_conversation
from worker import handoff as forwarding
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


class MergeWait(Exception):
    """The person may still be typing (the bot's merge-window-ms): look again in `delay_ms`, and
    meanwhile let the thread serve other conversations."""

    def __init__(self, delay_ms: int) -> None:
        super().__init__(delay_ms)
        self.delay_ms = delay_ms


# A merge waits at most this many windows from the first text, and takes at most this many texts.
MERGE_MAX_WINDOWS = 5
MERGE_MAX_TEXTS = 20


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
    except MergeWait as wait:
        finished, delay_ms = False, wait.delay_ms
    except BaseException:
        lease.release()
        raise
    if not lease.held:
        # Another worker holds it and looks again before it lets go; or the step that finished our
        # last reply let it go, having seen nothing waiting.
        return
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
        turn = _next_inbound(redis, conversation, lease)
        if turn is None:
            return True
        if not handle_message(redis, conversation, turn, lease):
            return True  # nothing was waiting: the look after letting go is the only one needed
        if time.monotonic() > stop_at:
            break
    return False


# KEYS: inbox, processing, lease, the person's replies this minute, the bot's handoffs copy, the
# registry's copy. ARGV: the lease's token, its ms when this run has yet to take it ('' when it holds
# it), the person, the person's number as a registry route.
# Takes the lease (or checks it is still ours), then a crashed worker's message first, else the
# oldest waiting one, with the replies the person got this minute, what the handoffs copy says of
# the person, and what the registry's copy says of the person's number (a bot's id or '', and
# whether the copy is loaded): {raw, replies, copy loaded, pause hint, bot id, registry loaded}.
# 0 when the lease is another's; {false} with no message.
_NEXT_LUA = """
if ARGV[2] ~= '' then
  if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
elseif redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return 0
end
local raw = redis.call('LINDEX', KEYS[2], 0) or redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
if not raw then return {false} end
local handoff = redis.call('HMGET', KEYS[5], '__LOADED__', ARGV[3])
local route = redis.call('HMGET', KEYS[6], ARGV[4], '__REGISTRY_LOADED__')
return {raw, redis.call('GET', KEYS[4]) or '0', handoff[1] or '', handoff[2] or '', route[1] or '', route[2] and 1 or 0}
""".replace("__LOADED__", handoff.LOADED).replace("__REGISTRY_LOADED__", REGISTRY_LOADED)


@dataclass(frozen=True)
class Turn:
    """The next message of a conversation, with what handling it needs to know."""

    raw: str
    bot: Bot | None  # as it is now; None once deleted
    replied: int  # replies the person got this minute
    copy_loaded: bool  # whether the bot's handoffs copy holds the database's
    pause_hint: str  # the copy's word on the person: '' when not paused
    # Whether the person's number is a bot's of this service, by the registry's copy (None: the copy
    # is not loaded, so the bot cache must say, rebuilding it).
    from_bot: bool | None = None


def _next_inbound(redis: Any, conversation: str, lease: Lease) -> Turn | None:
    """The next message, or None when there is none (or the lease is not ours); the first look also
    takes the lease. One round trip each."""
    first = not lease.held
    bot_id, sender = keys.split_conversation_id(conversation)
    found = script(redis, _NEXT_LUA)(
        keys=[keys.inbox(conversation), keys.processing(conversation), lease.key,
              keys.replies_this_minute(conversation), keys.handoffs(bot_id), keys.REGISTRY],
        args=[lease.token, int(LEASE_SECONDS * 1000) if first else "", sender, number_route(sender)])
    if first and not lease.granted(found != 0):
        return None
    if not found or not found[0]:
        return None
    raw, replied, loaded, hint, route, registry_loaded = found
    return Turn(raw, get_bots().by_id(bot_id), int(replied), bool(loaded), hint,
                bool(route) if route or registry_loaded else None)


def handle_message(redis: Any, conversation: str, turn: Turn, lease: Lease) -> bool:
    """Ask the bot's engine, log the message with its replies, queue the replies (finishing the
    message) and send the first one from this thread; the rest follow it through the outbound queue. Returns
    whether more messages may be waiting."""
    message = inbound_from(turn.raw)
    # Every event of this hop (engine, send) carries the message, its bot and its conversation.
    with structlog.contextvars.bound_contextvars(message_sid=message["sid"], bot_id=message["bot_id"],
                                                 conversation=conversation):
        return _handle(redis, conversation, turn, message, lease)


def _handle(redis: Any, conversation: str, turn: Turn, message: dict[str, Any], lease: Lease) -> bool:
    raw, bot, replied = turn.raw, turn.bot, turn.replied
    # A STOP or START, durably (the webhook told the Redis copy).
    optout.record_inbound(get_engine(), message, bot.opt_out_key(message["to"]) if bot else None)
    if bot is None:
        log.warning("conversation.bot_gone", bot_id=message["bot_id"], message_sid=message["sid"])
        return _unanswered(redis, conversation, raw, message, lease, None)
    if _from_bot(redis, turn, message["sender"]):
        # Another bot of this service: answering would start a loop that never ends.
        log.warning("conversation.from_bot", bot_id=bot.id, message_sid=message["sid"])
        TALLY.incr("sms_unanswered", reason="from_bot")
        return _unanswered(redis, conversation, raw, message, lease, message["to"])
    paused = _paused(redis, bot, message, turn)
    if paused is not None:
        # A human has the conversation: the message is logged and goes to their tool, not the engine.
        # The handoff-url is the bot's own endpoint: it holds the bot's engine slots, never other bots' threads.
        with ENGINE_SLOTS.taken(bot) as taken:
            if not taken and bot.handoff_url:
                log.info("conversation.engine_busy", bot_id=bot.id, message_sid=message["sid"],
                         in_flight=ENGINE_SLOTS.in_flight(bot.id))
                raise EngineBusy(bot.id)
            forwarded = forwarding.forward(bot, message, paused, get_settings())
        log.info("conversation.handed_off", bot_id=bot.id, message_sid=message["sid"], forwarded=forwarded)
        TALLY.incr("sms_unanswered", reason="handed_off")
        return _unanswered(redis, conversation, raw, message, lease, message["to"])
    if bot.limits.max_replies_per_minute and replied >= bot.limits.max_replies_per_minute:
        # A loop with an auto-responder elsewhere, or a flood: the engine is not asked until the minute is over.
        log.warning("conversation.rate_limited", bot_id=bot.id, message_sid=message["sid"], replies_this_minute=replied,
                    max_replies_per_minute=bot.limits.max_replies_per_minute)
        TALLY.incr("sms_unanswered", reason="rate_limited")
        return _unanswered(redis, conversation, raw, message, lease, message["to"])
    if bot.controls.merge_window_ms and message["event"] == optout.MESSAGE:
        raw, message = _merged(redis, conversation, raw, message, bot.controls.merge_window_ms, lease)
    started = time.monotonic()
    if message["event"] == optout.HELP and bot.keywords.help_message:
        answers = [Answer(text=bot.keywords.help_message)]  # the bot's own answer: the engine is not asked
    else:
        answers = _confirmation(bot, message["event"]) + _ask_engine(bot, message)
    replies = _replies(conversation, message, answers, bot.limits)
    if message["event"] == optout.OPT_OUT and bot.keywords.opt_out_message and replies:
        # The one message an opted-out person still gets; the engine's answer after it is suppressed.
        replies[0]["confirms_opt_out"] = True
    # After a long engine call the lease may have lapsed and passed on: then the new holder answers.
    if time.monotonic() - started > RENEW_EVERY and not lease.renew():
        raise LeaseLost(conversation)
    asked = next((answer for answer in answers if answer.handoff), None)
    if asked is not None and not _erased_since_received(redis, conversation, message):
        # Before its replies are queued: a worker that dies in between handles the message again,
        # and the pause names it, so that one message is still answered (see _paused).
        handoff.pause(get_engine(), redis, bot.id, message["sender"], by=handoff.BY_ENGINE,
                      timeout=bot.controls.handoff_timeout, note=asked.note, message_sid=message["sid"])
        log.info("conversation.handoff_requested", bot_id=bot.id, message_sid=message["sid"])
        TALLY.incr("sms_handoffs", event="paused", by=handoff.BY_ENGINE)
    # The log's record of this exchange goes with the replies, in their one Redis step (worker.logdrain).
    queued = queue_and_take(redis, conversation, replies, bot, done_inbound=raw, lease_token=lease.token,
                            log_record=exchange_record(message, replies, message["to"]), texted=message["to"])
    if queued.fenced:  # our lease lapsed (a pause) and another worker took over: it answers
        raise LeaseLost(conversation)
    if queued.erased:
        log.info("conversation.erased_meanwhile", bot_id=bot.id, message_sid=message["sid"], replies=len(replies))
        return queued.waiting
    log.info("conversation.answered", bot_id=bot.id, message_sid=message["sid"], replies=len(replies))
    # The outbox was idle: nobody else will send the first reply. Sending it here, rather than
    # through a send_reply message, spares a Dramatiq message per reply; the outbox lease,
    # pacing and opt-out checks are the same (taken in the queuing step), and a crash leaves it
    # to the sweeper.
    if queued.lease is not None:
        # With no message waiting, the step that finishes the reply lets the conversation go too.
        deliver_taken(conversation, replies[0], bot, queued, lets_go=None if queued.waiting else lease)
    elif queued.head:
        deliver_now(conversation, queued.head)  # the outbox lease was busy: bounce it to its holder
    if queued.waiting is None:
        # Not counted when the send was claimed: the step that finished the reply let the conversation
        # go if nothing waited; still held, something may (or the reply was not finished: look).
        return lease.held
    return queued.waiting


def _from_bot(redis: Any, turn: Turn, sender: str) -> bool:
    """Whether the text comes from a number of a bot of this service: registered (the registry's
    copy, read with the message; the bot cache when the copy was not loaded) or seen sending for a
    bot's Messaging Service."""
    registered = turn.from_bot if turn.from_bot is not None else get_bots().is_bot_number(sender)
    return registered or POOL_NUMBERS.owner(redis, sender) is not None


def _erased_since_received(redis: Any, conversation: str, message: dict[str, Any]) -> bool:
    """Whether the conversation was erased while its message was answered: a handoff (and its note)
    recorded now would outlive the erase."""
    erased = erased_since(redis, [conversation]).get(conversation)
    return erased is not None and erased >= message["received_at"]


def _ask_engine(bot: Bot, message: dict[str, Any]) -> list[Answer]:
    with ENGINE_SLOTS.taken(bot) as taken:
        if not taken:
            log.info("conversation.engine_busy", bot_id=bot.id, message_sid=message["sid"],
                     in_flight=ENGINE_SLOTS.in_flight(bot.id))
            raise EngineBusy(bot.id)
        return engine_for(bot, get_settings()).answer(bot, message)


def _confirmation(bot: Bot, event: str) -> list[Answer]:
    """The bot's confirmation of an opt-out or opt-in, sent before the engine's answer, if it has one."""
    text = {optout.OPT_OUT: bot.keywords.opt_out_message, optout.OPT_IN: bot.keywords.opt_in_message}.get(event)
    return [Answer(text=text)] if text else []


def _paused(redis: Any, bot: Bot, message: dict[str, Any], turn: Turn) -> handoff.Handoff | None:
    """The conversation's handoff, when a human has it; not when the engine asked for it while
    answering this very message (handled again after a crash: it is still answered)."""
    hint = turn.pause_hint
    if not turn.copy_loaded:  # flushed or never built: rebuilt from the record first
        handoff.load_copy(get_engine(), redis, bot.id)
        hint = redis.hget(keys.handoffs(bot.id), message["sender"]) or ""
    if not hint:
        return None
    found = handoff.current(get_engine(), redis, bot.id, message["sender"], hint)
    if found is None or found.message_sid == message["sid"]:
        return None
    return found


# KEYS: inbox, processing, the conversation lease. ARGV: the lease's token, the message being
# handled (processing's head), the merged message that replaces it, then the texts merged into
# it, as they lead the inbox. The texts leave the inbox and the merged message takes the head's
# place in one step; 1 done, 0 when something changed meanwhile (nothing done), -1 when the lease
# is no longer ours.
_MERGE_LUA = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[2] then return 0 end
local taken = #ARGV - 3
local leading = redis.call('LRANGE', KEYS[1], 0, taken - 1)
if #leading ~= taken then return 0 end
for i = 1, taken do
  if leading[i] ~= ARGV[i + 3] then return 0 end
end
redis.call('LTRIM', KEYS[1], taken, -1)
redis.call('LSET', KEYS[2], 0, ARGV[3])
return 1
"""


def _merged(redis: Any, conversation: str, raw: str, message: dict[str, Any], window_ms: int,
            lease: Lease) -> tuple[str, dict[str, Any]]:
    """The message with the texts the person sent right after it, as one turn (merge-window-ms);
    MergeWait while they may still be typing. Nothing waits in a thread: the conversation is looked
    at again when the window can next have closed. A non-text event (STOP, START) ends the burst."""
    window = window_ms / 1000
    waiting = redis.lrange(keys.inbox(conversation), 0, MERGE_MAX_TEXTS - 1)
    texts: list[tuple[str, dict[str, Any]]] = []
    for item in waiting:
        later = inbound_from(item)
        if later["event"] != optout.MESSAGE:
            break
        texts.append((item, later))
    parts = list(message.get("merged") or [message])
    first_at = parts[0]["received_at"]
    last_at = max(part["received_at"] for part in [*parts, *(later for _, later in texts)])
    burst_over = len(texts) < len(waiting) or len(parts) + len(texts) >= MERGE_MAX_TEXTS
    close_at = min(last_at + window, first_at + MERGE_MAX_WINDOWS * window)
    if not burst_over and time.time() < close_at:
        raise MergeWait(max(int((close_at - time.time()) * 1000) + 1, 1))
    if not texts:
        return raw, message
    parts += [later for _, later in texts]
    merged = {
        **message,
        "body": "\n".join(part["body"] for part in parts if part["body"]),
        "media": [media for part in parts for media in part["media"]],
        "num_segments": sum(part.get("num_segments", 1) for part in parts),
        "message_sids": [part["sid"] for part in parts],
        "merged": [{name: part[name] for name in _ORIGINAL_FIELDS if name in part} for part in parts],
    }
    merged_raw = json.dumps(merged)
    done = script(redis, _MERGE_LUA)(keys=[keys.inbox(conversation), keys.processing(conversation), lease.key],
                                     args=[lease.token, raw, merged_raw, *(item for item, _ in texts)])
    if done == FENCED:
        raise LeaseLost(conversation)
    if not done:  # the inbox changed under us (an erasure): answer the one message
        return raw, message
    log.info("conversation.merged", texts=len(parts), waited_ms=int((time.time() - first_at) * 1000))
    return merged_raw, merged


# What a merged turn keeps of each text it was made of: what the log and the handoff forward need.
_ORIGINAL_FIELDS = ("sid", "bot_id", "sender", "to", "body", "media", "received_at", "event", "num_segments")


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
