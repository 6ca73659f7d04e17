"""Sending: the head of a conversation's outbox goes to Twilio, in order, at its number's pace.

Only the outbox head is ever worked on, by whoever holds the outbox lease; finishing it (sent,
suppressed or failed for good) kicks the next head, so one kick starts a chain that drains the
outbox. A reply that must wait for its pacing slot or for a retry is scheduled for later rather
than slept on, so no worker thread is held by a busy number.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import dramatiq
import structlog
from twilio.base.exceptions import TwilioRestException

from shared import conversations, deadletters, keys, messagelog, optout
from shared.bots import Bot
from shared.conversations import (
    CALLBACK_SUFFIX, ERASED, FENCED, QUEUE_FUNCTION, REPLY, RESEND_MARK, SENDING_SUFFIX, callback_field,
    new_reply, queue_args, queue_keys_of, queue_replies, resend_attempt, reschedule, sending_field, stored,
)
from shared.db import transaction
from shared.logging import get_logger
from shared.metrics import TALLY
from shared.poolnumbers import POOL_NUMBERS
from shared.redis import script, with_constants
from shared.segments import count_segments
from shared.tasks import OUTBOUND_QUEUE, RESEND_REPLY, SEND_REPLY, get_broker, kick_delivery
from shared.twilio_errors import BACKOFF, HINTS, Action, action_for, backoff
from worker import budget, pacing
from worker.budget import DAILY_SENDS
from worker.deps import get_bots, get_engine, get_redis, get_settings
from worker.locks import LEASE_SECONDS, Lease
from worker.logdrain import outcome_record
from worker.pacing import CONFIRM_FUNCTION, RESERVE_FUNCTION
from worker.twilio_client import Accepted, Refused, Sender, client_for, find_sent, outcome_unknown, send_sms

log = get_logger(__name__)

# Waits up to this long are slept in-thread; longer ones are scheduled.
SHORT_WAIT_SECONDS = 0.3
# deliver_now runs on the conversation's thread: it sleeps only waits shorter than scheduling
# would take (a fast number busy with another conversation's send), and schedules the rest.
INLINE_WAIT_SECONDS = 0.01
# A scheduled message reaches a thread a little late (Dramatiq polls its delay queue):
# schedule it this much early and sleep the rest, so a paced number keeps its rate.
SCHEDULE_LEAD_SECONDS = 0.2
MAX_SHORT_WAITS = 10
# A kick for the head that finds the outbox lease taken looks again after this long.
BUSY_RECHECK_MS = 500
# A send whose outcome is unknown looks again this often while it waits (for a status callback,
# or for Twilio's message list to be asked again after a failed look).
RECONCILE_RECHECK_SECONDS = 5.0
# Without PUBLIC_URL no status callback can come: Twilio's list is asked after this long (a
# message appears there as soon as the create is accepted).
NO_CALLBACK_GRACE_SECONDS = 5.0
# A retry message may arrive slightly before not_before on another host's clock.
CLOCK_TOLERANCE_SECONDS = 1.0
# Retries stop this long after the first attempt: the reply is then failed as "exhausted".
RETRY_BUDGET_SECONDS = 3600.0
# Unexpected errors (Redis down, a bug) are retried a few times by Dramatiq, then dead-lettered
# by it; a reply Twilio refuses for good is a dead letter in the database instead (_fail).
MAX_UNEXPECTED_RETRIES = 5


class SendRetry(dramatiq.Retry):
    """Twilio said "later": Dramatiq's Retries middleware re-enqueues the message after `delay` ms."""


def _retry_when(retries: int, exception: BaseException) -> bool:
    if isinstance(exception, SendRetry):
        return True  # send_reply keeps its own one-hour budget
    return retries < MAX_UNEXPECTED_RETRIES


@dataclass(frozen=True)
class Step:
    """What to do once the outbox lease is released: kick a reply (now or later), raise an error."""

    kick: str | None = None
    kick_delay_ms: int | None = None
    error: Exception | None = None


@dramatiq.actor(
    actor_name=SEND_REPLY, queue_name=OUTBOUND_QUEUE, broker=get_broker(),
    retry_when=_retry_when, min_backoff=1000, max_backoff=60_000,
)
def send_reply(conversation: str, reply_id: str, failed: str | None = None) -> None:
    """Send `reply_id` if it is the head of the conversation's outbox, then kick the next head."""
    if failed is not None:
        # Handed over by an earlier release's deliver_now, its reply already finished and kept at
        # keys.dead_reply (which `mammut-sms migrate --from-redis` copies): nothing left to do.
        log.warning("outbound.legacy_failure", conversation=conversation, reply_id=reply_id, error=failed)
        return
    with structlog.contextvars.bound_contextvars(conversation=conversation, reply_id=reply_id):
        step = _attempt(conversation, reply_id, SHORT_WAIT_SECONDS)
    if step.error is not None:
        raise step.error


@dramatiq.actor(actor_name=RESEND_REPLY, queue_name=OUTBOUND_QUEUE, broker=get_broker(),
                max_retries=10, min_backoff=500, max_backoff=30_000)
def resend_reply(bot_id: int, reply_id: str, from_number: str | None, code: int) -> None:
    """Send again a reply that Twilio accepted and then could not queue (30001 by status callback,
    webhook.status): a new reply at the end of its conversation, past MAX_RESENDS a dead letter."""
    with get_engine().connect() as connection:
        sent = messagelog.sent_reply(connection, bot_id, reply_id)
    if sent is None:
        raise LookupError(f"reply {reply_id} is not in the log yet")  # the log trails the send: retried
    first_id, attempt = resend_attempt(reply_id)
    conversation = keys.conversation_id(bot_id, sent["person"])
    if attempt > conversations.MAX_RESENDS:
        with transaction(get_engine()) as connection:
            deadletters.record(connection, {
                "id": reply_id, "bot_id": bot_id, "person": sent["person"], "text": sent["text"],
                "media_url": sent["media_url"], "error_code": code, "http_status": None,
                "error": "Twilio's queue refused it by status callback", "reason": "exhausted", "attempts": attempt,
                "failed_at": time.time()})
        log.warning("outbound.failed", bot_id=bot_id, conversation=conversation, reply_id=reply_id, code=code,
                    reason="exhausted", attempts=attempt, hint=HINTS.get(code))
        TALLY.incr("sms_outbound", result="failed", code=code)
        return
    reply = new_reply(conversation, sent["person"], sent["text"], sent["media_url"], in_reply_to=sent["in_reply_to"])
    reply.update(id=f"{first_id}{RESEND_MARK}{attempt}", attempts=attempt, error_code=code, from_number=from_number)
    with transaction(get_engine()) as connection:
        messagelog.record_replies(connection, [reply], sent["bot_number"], origin=sent["origin"])
    kick = queue_replies(get_redis(), conversation, [reply])
    if kick is not None:
        kick_delivery(conversation, kick)
    TALLY.incr("sms_outbound", result="retried", code=code)
    log.info("outbound.resent", bot_id=bot_id, conversation=conversation, reply_id=reply["id"], code=code,
             attempts=attempt)


def deliver_now(conversation: str, reply_id: str) -> None:
    """Send a reply from the calling thread, e.g. the conversation actor's right after
    `queue_replies` returned it: one Dramatiq message fewer per reply. A retry is handed to
    send_reply; a reply that must wait for its pacing slot is scheduled (beyond a few
    milliseconds, see INLINE_WAIT_SECONDS), so the caller's thread is not held by a busy number."""
    _hand_over_retry(conversation, reply_id, _attempt(conversation, reply_id, INLINE_WAIT_SECONDS, settles=False))


def _hand_over_retry(conversation: str, reply_id: str, step: Step) -> None:
    if isinstance(step.error, SendRetry):
        kick_delivery(conversation, reply_id, delay_ms=step.error.delay)


def _attempt(conversation: str, reply_id: str, longest_sleep: float, settles: bool = True) -> Step:
    redis = get_redis()
    lease = Lease(redis, keys.outbox_lock(conversation))
    head = _take_head(redis, conversation, reply_id, lease, settles)
    if not lease.held:
        if head is not None:
            # The holder normally works the head and chains on; but it may be a stale duplicate
            # that will do nothing, so a head that was bounced comes back shortly to check.
            kick_delivery(conversation, reply_id, delay_ms=BUSY_RECHECK_MS)
        return Step()
    return _run(redis, conversation, head, lease, longest_sleep)


def _run(redis: Any, conversation: str, head: Head | None, lease: Lease, longest_sleep: float,
         looked: tuple[list[str | None], str] | None = None) -> Step:
    """Work the head under the held outbox lease, let the lease go, then kick what comes next."""
    try:
        step = _work_head(redis, conversation, head, lease, longest_sleep, looked) if head is not None else Step()
    finally:
        lease.release()  # unless already released with the send's bookkeeping
    # Only after the release: the kicked message must be able to take the lease.
    if step.kick is not None:
        kick_delivery(conversation, step.kick, delay_ms=step.kick_delay_ms)
    return step


# Queue an answer's replies (QUEUE_FUNCTION, fenced by the conversation lease) and tell whether
# the conversation's inbox holds more; when the outbox was idle, go on to take the first reply's
# turn: the outbox lease, the opt-out copy's word on the recipient and the pace's reservation,
# all in the same step, so the conversation's thread sends it without another round trip.
# Also counts the replies toward the person's max-replies-per-minute.
# KEYS: QUEUE_FUNCTION's six, then inbox, outbox lease, opt-out copy, pace hash, replies this minute.
# ARGV: QUEUE_FUNCTION's five, then the outbox lease's token and ms, the recipient, the opt-out
#       copy's loaded marker, the pace's interval and ttl, then the (id, reply) pairs.
# Returns {head or FENCED or ERASED or false, messages waiting, and when the lease was taken: 1, the
# opt-out copy's two values, the pace's turn}. When the first reply's send is claimed here, the
# messages waiting are not counted (false) and the pending set is not touched: the step that
# finishes the reply does both (FINISH_LUA, which lets the conversation go if none waits); the
# conversation is in the pending set since its message was accepted, and a worker that dies
# before that step leaves it there.
QUEUE_AND_TAKE_LUA = QUEUE_FUNCTION + RESERVE_FUNCTION + with_constants("""
local head = queue(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 12,
                   true, true)
local n = (#ARGV - 11) / 2
local refused = head == -1 or head == -2
-- The first reply's record, written below: with its send's mark when the send is claimed at once.
local first = (not refused and n > 0) and {ARGV[12], ARGV[13]} or nil
if first and redis.call('INCRBY', KEYS[11], n) == n then redis.call('EXPIRE', KEYS[11], 120) end
local function unclaimed()  -- what queue() leaves to this step when the send is not claimed here
  if first then redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2]) end
  return redis.call('LLEN', KEYS[7])
end
if not head or refused or not redis.call('SET', KEYS[8], ARGV[6], 'NX', 'PX', ARGV[7]) then
  if first then redis.call('HSET', KEYS[2], unpack(first)) end
  return {head, unclaimed()}
end
local looked = redis.call('HMGET', KEYS[9], ARGV[8], ARGV[9])
local turn, claimed = reserve(KEYS[10], ARGV[10], ARGV[11], KEYS[2], head .. '__SENDING__', first)
return {head, not claimed and unclaimed(), 1, looked[1] or false, looked[2] or false, turn}
""", SENDING=SENDING_SUFFIX)


@dataclass(frozen=True)
class Queued:
    """What queue_and_take did: the head to send (None: the outbox was busy, or nothing was
    queued), whether the step was fenced, whether more messages wait (None: not counted, the first
    reply's send being claimed; the step that finishes it looks), the taken turn, and whether the
    conversation was erased while its message was answered (nothing was queued or logged)."""

    head: str | None
    fenced: bool
    waiting: bool | None
    lease: Lease | None
    looked: tuple[list[str | None], str] | None
    erased: bool = False


def queue_and_take(redis: Any, conversation: str, replies: list[dict[str, Any]], bot: Bot, done_inbound: str,
                   log_record: str, lease_token: str, texted: str | None = None) -> Queued:
    """Queue the replies of one answer and, when the outbox was idle, take the first one's turn.
    `texted`: the number the answered text was sent to, which the replies go from (a pooled bot)."""
    if bot.pooled and texted:
        for reply in replies:
            reply["from_number"] = texted
    leading, pairs = queue_args(conversation, replies, done_inbound, log_record, lease_token)
    lease = Lease(redis, keys.outbox_lock(conversation))
    first = replies[0] if replies else {"to": "", "text": ""}
    sender = sender_for(bot, first)
    result = script(redis, QUEUE_AND_TAKE_LUA)(
        keys=[*queue_keys_of(conversation), keys.inbox(conversation), lease.key, keys.opted_out(sender.opt_out_key),
              keys.pace(sender.pace_key), keys.replies_this_minute(conversation)],
        args=[*leading, lease.token, int(LEASE_SECONDS * 1000), first["to"], optout.LOADED,
              *pacing.reserve_args(count_segments(first["text"]), bot.messages_per_second), *pairs],
    )
    head, waiting, *taken = result
    if head == FENCED:
        return Queued(None, True, bool(waiting), None, None)
    if head == ERASED:
        return Queued(None, False, bool(waiting), None, None, erased=True)
    if not taken:
        return Queued(head or None, False, bool(waiting), None, None)
    lease.granted(taken[0])
    return Queued(head, False, None if waiting is None else bool(waiting), lease, (taken[1:3], taken[3]))


def deliver_taken(conversation: str, reply: dict[str, Any], bot: Bot, queued: Queued,
                  lets_go: Lease | None = None) -> None:
    """deliver_now for a reply whose turn queue_and_take already took. `lets_go`: the
    conversation's lease, to let go in the step that finishes the reply if no message waits then
    (it is no longer held afterwards)."""
    assert queued.lease is not None and queued.head == reply["id"]
    head = Head(reply["id"], reply, bot, settles=False, lets_go=lets_go)
    step = _run(get_redis(), conversation, head, queued.lease, INLINE_WAIT_SECONDS, queued.looked)
    _hand_over_retry(conversation, reply["id"], step)


@dataclass(frozen=True)
class Head:
    """The outbox head being worked on, with its reply record and its bot."""

    id: str
    reply: dict[str, Any] | None
    bot: Bot | None
    # Whether finishing it may drop the conversation from the pending set. Not when the
    # conversation's own drain sends it (deliver_now): that drain settles once, as it lets go.
    settles: bool = True
    # Set when an earlier attempt may have sent it (its outcome is unknown): when that attempt
    # claimed its turn, and the MessageSid a status callback named for it since, if any.
    sending_since: float | None = None
    callback_sid: str | None = None
    # The bot's number the person last texted (keys.texted), for a bot with several or a service.
    texted: str | None = None
    # The conversation's lease, when its drain has nothing more to do once this reply is finished
    # (deliver_taken): the finishing step lets it go too if no message waits, sparing the drain's own step.
    lets_go: Lease | None = None


def sender_for(bot: Bot, reply: dict[str, Any], texted: str | None = None) -> Sender:
    """Who a reply goes from. A bot with a messaging service sends through it, From the number the
    person texted when known (else the service's Sticky Sender picks); a bot without one, from the
    number texted if it is still the bot's, else its main-phone-number. A push (`texted`: the number
    last texted, up to 48 hours ago) never goes From a number the bot no longer lists: it may be
    another bot's now."""
    sending = bot.sending
    options = {"validity_period": sending.validity_period, "smart_encoded": sending.smart_encoded,
               "shorten_urls": sending.shorten_urls}
    if not bot.pooled:
        return Sender(bot.number, **options)
    chosen = reply.get("from_number") or (texted if texted in bot.numbers else None)
    if bot.messaging_service_sid:
        return Sender(chosen, bot.messaging_service_sid, **options)
    return Sender(chosen if chosen in bot.numbers else bot.number, **options)


def _take_head(redis: Any, conversation: str, reply_id: str, lease: Lease, settles: bool = True) -> Head | None:
    """Ask for the outbox lease and read everything a send needs, in one round trip; None unless
    `reply_id` is the outbox head (else already sent, or a duplicate kick)."""
    bot = get_bots().by_id(keys.split_conversation_id(conversation)[0])
    pipe = redis.pipeline(transaction=False)
    lease.request(pipe)
    pipe.lindex(keys.outbox(conversation), 0)
    pipe.hmget(keys.replies(conversation), [reply_id, sending_field(reply_id), callback_field(reply_id)])
    if bot is not None and bot.pooled:
        pipe.get(keys.texted(conversation))
    granted, head, (reply, sending_since, callback_sid), *texted = pipe.execute()
    lease.granted(granted)
    if head != reply_id:
        return None
    return Head(reply_id, REPLY.load(json.loads(reply)) if reply else None, bot, settles,
                float(sending_since) if sending_since else None, callback_sid, texted[0] if texted else None)


def _work_head(redis: Any, conversation: str, head: Head, lease: Lease, longest_sleep: float,
               looked: tuple[list[str | None], str] | None = None) -> Step:
    """Send the head (or suppress, schedule, retry or fail it). `looked`: the opt-out copy's word
    and the pace's turn, when the step that took the lease read them already (queue_and_take)."""
    reply, bot = head.reply, head.bot
    if reply is None or bot is None:
        return _dropped(redis, conversation, head)
    if reply["not_before"] and reply["not_before"] > time.time() + CLOCK_TOLERANCE_SECONDS:
        return Step()  # a retry is scheduled; its message will send it
    settings = get_settings()
    client = client_for(bot, settings)  # before the slot is claimed, so the send follows at once
    sender = sender_for(bot, reply, head.texted)
    if head.sending_since is not None:
        settled = _reconcile(redis, conversation, head, lease, client, settings, sender)
        if settled is not None:
            return settled
    if DAILY_SENDS.exhausted(bot):
        return _hold_back(redis, conversation, reply, bot)
    ours, opted_out, wait = _first_look(redis, reply, bot, lease, sender) if looked is None else \
        _after_look(redis, reply, bot, sender, *looked)
    if not ours:
        return _lease_lost(conversation, reply)
    if opted_out and not reply.get("confirms_opt_out"):
        return _suppress(redis, conversation, head)
    wait = _wait_for_slot(redis, reply, sender.pace_key, bot.messages_per_second, wait, longest_sleep)
    if wait > 0:
        return _schedule(redis, conversation, reply, wait)
    if lease.lost:  # the renewer found it taken while we waited for the slot
        return _lease_lost(conversation, reply)
    result = send_sms(client, sender, reply["to"], reply["text"], reply["media_url"], settings.public_url, reply["id"])
    if isinstance(result, Accepted):
        return _sent(redis, conversation, head, result, lease, sender)
    pacing.confirm(redis, sender.pace_key, count_segments(reply["text"]), bot.messages_per_second)
    if outcome_unknown(result):
        return _outcome_unknown(redis, conversation, reply, result, settings)
    redis.hdel(keys.replies(conversation), sending_field(reply["id"]))  # Twilio says it was not created
    return _refused(redis, conversation, head, result, sender)


def _first_look(redis: Any, reply: dict[str, Any], bot: Bot, lease: Lease, sender: Sender) -> tuple[bool, bool, float]:
    """Whether the outbox lease is still ours, whether the recipient opted out, and the reply's
    first turn on its number (its slot reserved or claimed), in one round trip. A suppressed
    reply's reservation goes unused: its number idles one interval, a rare and harmless cost next
    to a round trip on every send."""
    pipe = redis.pipeline(transaction=False)
    pipe.get(lease.key)
    optout.request_look(pipe, sender.opt_out_key, reply["to"])
    pacing.request_turn(pipe, sender.pace_key, count_segments(reply["text"]), bot.messages_per_second,
                        reply["slot_at"], mark=sending_mark(reply))
    holder, looked, raw = pipe.execute()
    if holder != lease.token:
        return False, False, 0.0
    return _after_look(redis, reply, bot, sender, looked, raw)


def _after_look(redis: Any, reply: dict[str, Any], bot: Bot, sender: Sender, looked: list[str | None],
                raw: str) -> tuple[bool, bool, float]:
    """_first_look's answer from what it read, for a lease known to be ours."""
    # The database is asked only when the copy is missing (rebuilt first) or names the recipient.
    opted_out = optout.opted_out_after_look(get_engine(), redis, sender.opt_out_key, reply["to"], looked)
    reserved = reply["slot_at"] is None
    reply["slot_at"], wait = pacing.turn(raw, reply["slot_at"])
    if reserved and wait > 0 and (not opted_out or reply.get("confirms_opt_out")):
        _save(redis, reply)  # reserved once: a re-run keeps its place in the schedule
    return True, opted_out, wait


def _hold_back(redis: Any, conversation: str, reply: dict[str, Any], bot: Bot) -> Step:
    """The bot sent its max-messages-per-day: the reply (and those after it) wait, and look again
    every few minutes, so a raised limit or the next UTC day releases them."""
    wait = min(budget.RECHECK_SECONDS, budget.seconds_to_next_day())
    log.warning("outbound.held_back", bot_id=bot.id, conversation=conversation, reply_id=reply["id"],
                max_messages_per_day=bot.limits.max_messages_per_day,
                max_segments_per_day=bot.limits.max_segments_per_day, recheck_in=round(wait))
    TALLY.incr("sms_outbound", result="held_back")
    return _schedule(redis, conversation, reply, wait)


def sending_mark(reply: dict[str, Any]) -> tuple[str, str]:
    """Where the step that claims a reply's send marks it as under way (worker.pacing)."""
    return keys.replies(reply["conversation"]), sending_field(reply["id"])


def _outcome_unknown(redis: Any, conversation: str, reply: dict[str, Any], refused: Refused, settings: Any) -> Step:
    """The send may have reached Twilio (no answer came back): it is neither retried nor failed
    now, but settled by _reconcile once Twilio has told us (a status callback) or can be asked."""
    wait = min(_grace(settings), RECONCILE_RECHECK_SECONDS)
    log.warning("outbound.outcome_unknown", bot_id=reply["bot_id"], conversation=conversation, reply_id=reply["id"],
                http_status=refused.http_status, error=refused.message, recheck_in=round(wait, 1))
    TALLY.incr("sms_outbound", result="outcome_unknown")
    return _schedule(redis, conversation, reply, wait)


def _grace(settings: Any) -> float:
    """How long an unknown outcome waits for Twilio's status callback before Twilio is asked."""
    return float(settings.send_reconcile_seconds) if settings.public_url else NO_CALLBACK_GRACE_SECONDS


def _reconcile(redis: Any, conversation: str, head: Head, lease: Lease, client: Any, settings: Any,
               sender: Sender) -> Step | None:
    """An earlier attempt claimed this reply's send and its outcome is unknown (its answer was lost,
    its worker died): settle it without guessing. A status callback that named its MessageSid
    finishes it as sent; otherwise, within the grace period, wait for one; after it, ask Twilio's
    message list: found, finished as sent; not there, None (send it again). Later replies of the
    conversation wait behind it all along."""
    reply, bot = head.reply, head.bot
    assert reply is not None and bot is not None and head.sending_since is not None
    if head.callback_sid:
        return _reconciled(redis, conversation, head, lease, head.callback_sid, "callback")
    age = time.time() - head.sending_since
    if age < _grace(settings):
        return _schedule(redis, conversation, reply, min(_grace(settings) - age, RECONCILE_RECHECK_SECONDS))
    try:
        sid = find_sent(client, sender.from_, reply["to"], reply["text"], head.sending_since, _other_replies)
    except (TwilioRestException, OSError) as error:
        log.warning("outbound.reconcile_failed", bot_id=bot.id, conversation=conversation, reply_id=reply["id"],
                    error=f"{error.__class__.__name__}: {error}"[:300])
        return _schedule(redis, conversation, reply, RECONCILE_RECHECK_SECONDS)
    if sid is not None:
        return _reconciled(redis, conversation, head, lease, sid, "lookup-found")
    redis.hdel(keys.replies(conversation), sending_field(reply["id"]))
    _log_reconciled(bot.id, conversation, reply["id"], None, "lookup-absent-resent")
    return None


def _other_replies(sids: list[str]) -> set[str]:
    with get_engine().connect() as connection:
        return messagelog.known_sids(connection, sids)


def _reconciled(redis: Any, conversation: str, head: Head, lease: Lease, sid: str, how: str) -> Step:
    """Twilio has the message: finish the reply as sent, with the MessageSid it gave it."""
    reply, bot = head.reply, head.bot
    assert reply is not None and bot is not None
    next_head = _finish(redis, conversation, head, "queued", sid=sid, at=time.time(), lease=lease)
    TALLY.incr("sms_outbound", result="sent")
    DAILY_SENDS.sent(bot.id, count_segments(reply["text"]))
    _log_reconciled(bot.id, conversation, reply["id"], sid, how)
    return Step(kick=next_head)


def _log_reconciled(bot_id: int, conversation: str, reply_id: str, sid: str | None, how: str) -> None:
    log.info("outbound.reconciled", bot_id=bot_id, conversation=conversation, reply_id=reply_id, twilio_sid=sid,
             how=how)
    TALLY.incr("sms_reconciled", how=how)


def _lease_lost(conversation: str, reply: dict[str, Any]) -> Step:
    """Another worker holds this outbox now (ours lapsed in a pause): it sends; we send nothing."""
    log.warning("outbound.lease_lost", bot_id=reply["bot_id"], conversation=conversation, reply_id=reply["id"])
    return Step()


def _wait_for_slot(redis: Any, reply: dict[str, Any], number: str, rate: float, wait: float,
                   longest_sleep: float) -> float:
    """Seconds still to wait for this reply's turn on its number, after a first look that said
    `wait`; 0.0 once the send is claimed. Waits of up to `longest_sleep` are slept here; the
    caller schedules longer ones."""
    segments = count_segments(reply["text"])
    for _ in range(MAX_SHORT_WAITS):
        if not 0 < wait <= longest_sleep:
            break
        time.sleep(wait)
        wait = pacing.claim(redis, number, segments, rate, reply["slot_at"], mark=sending_mark(reply))
    return wait


def _schedule(redis: Any, conversation: str, reply: dict[str, Any], wait: float) -> Step:
    """Come back for this same reply when its slot is near; a new message, not a retry."""
    reschedule(redis, conversation, time.time() + wait)
    delay = max(wait - SCHEDULE_LEAD_SECONDS, 0.0)
    log.debug("outbound.paced", conversation=conversation, reply_id=reply["id"], wait=round(wait, 3))
    return Step(kick=reply["id"], kick_delay_ms=int(delay * 1000))


def _sent(redis: Any, conversation: str, head: Head, accepted: Accepted, lease: Lease, sender: Sender) -> Step:
    """Twilio took it: the pace, the outbox, the log's record and the lease, in one step (the
    lease last, so it is free when the next head is kicked)."""
    reply, bot = head.reply, head.bot
    assert reply is not None and bot is not None
    now = time.time()
    next_head = _finish(redis, conversation, head, accepted.status, sid=accepted.sid, at=now, lease=lease,
                        pace=(sender.pace_key, count_segments(reply["text"]), bot.messages_per_second))
    TALLY.incr("sms_outbound", result="sent")
    DAILY_SENDS.sent(bot.id, count_segments(reply["text"]))
    if sender.messaging_service_sid:  # a pool number, maybe unlisted: a bot number for the loop guard
        POOL_NUMBERS.learn(redis, accepted.from_ or sender.from_, bot.id)
    if reply["received_at"]:
        TALLY.observe("sms_webhook_to_twilio_seconds", now - reply["received_at"])
    # twilio_sid is this reply's own message; in_reply_to is the inbound MessageSid it answers.
    log.info("outbound.sent", twilio_sid=accepted.sid, in_reply_to=reply["in_reply_to"], bot_id=reply["bot_id"],
             conversation=conversation, reply_id=reply["id"], status=accepted.status)
    return Step(kick=next_head)


def _dropped(redis: Any, conversation: str, head: Head) -> Step:
    log.warning("outbound.dropped", conversation=conversation, reply_id=head.id,
                reason="no reply record" if head.reply is None else "bot deleted")
    return Step(kick=_finish(redis, conversation, head, "failed"))


def _suppress(redis: Any, conversation: str, head: Head) -> Step:
    """Nothing is ever sent to a recipient who opted out: the reply is dropped, visibly."""
    next_head = _finish(redis, conversation, head, "suppressed")
    TALLY.incr("sms_outbound", result="suppressed")
    log.info("outbound.suppressed", bot_id=head.bot.id if head.bot else None, conversation=conversation,
             reply_id=head.id)
    return Step(kick=next_head)


def _refused(redis: Any, conversation: str, head: Head, refused: Refused, sender: Sender) -> Step:
    reply, bot = head.reply, head.bot
    assert reply is not None and bot is not None
    action = action_for(refused.http_status, refused.code)
    now = time.time()
    reply["attempts"] += 1
    reply["first_attempt_at"] = reply["first_attempt_at"] or now
    reply["error_code"] = refused.code
    if action is Action.OPTED_OUT:
        return _opted_out(redis, conversation, head, sender.opt_out_key)
    if action in BACKOFF:
        delay = backoff(action, reply["attempts"])
        if now + delay - reply["first_attempt_at"] <= RETRY_BUDGET_SECONDS:
            return _retry(redis, conversation, reply, refused, delay)
        return _fail(redis, conversation, head, refused, reason="exhausted")
    return _fail(redis, conversation, head, refused, reason="permanent")


def _retry(redis: Any, conversation: str, reply: dict[str, Any], refused: Refused, delay: float) -> Step:
    reply["not_before"] = time.time() + delay
    reply["slot_at"] = None  # the retry takes a fresh place in the number's schedule
    _save(redis, reply)
    reschedule(redis, conversation, reply["not_before"])
    TALLY.incr("sms_outbound", result="retried", code=refused.code or refused.http_status or "none")
    log.info("outbound.retried", bot_id=reply["bot_id"], conversation=conversation, reply_id=reply["id"],
             code=refused.code, http_status=refused.http_status, attempts=reply["attempts"],
             delay=round(delay, 3), error=refused.message)
    return Step(error=SendRetry(f"Twilio answered {refused.http_status}/{refused.code}", delay=int(delay * 1000)))


def _opted_out(redis: Any, conversation: str, head: Head, number: str) -> Step:
    """21610: the recipient texted STOP. Remember it; nothing to retry or replay until START."""
    reply = head.reply
    assert reply is not None
    optout.opt_out(get_engine(), redis, number, reply["to"], how=optout.HOW_21610)
    next_head = _finish(redis, conversation, head, "failed", error_code=reply["error_code"])
    TALLY.incr("sms_outbound", result="failed", code=reply["error_code"])
    log.info("outbound.opted_out", bot_id=reply["bot_id"], conversation=conversation, reply_id=reply["id"],
             code=reply["error_code"], hint=HINTS.get(reply["error_code"]))
    return Step(kick=next_head)


def _fail(redis: Any, conversation: str, head: Head, refused: Refused, reason: str) -> Step:
    """Keep the reply as a dead letter in the database (for `mammut-sms dlq`), then move on. The
    Dramatiq message ends here: its dead-letter queue would keep it in Redis for a week."""
    reply = head.reply
    assert reply is not None
    code = refused.code
    with transaction(get_engine()) as connection:  # first: if this fails, the reply is still queued
        deadletters.record(connection, {
            "id": reply["id"], "bot_id": reply["bot_id"], "person": reply["to"], "text": reply["text"],
            "media_url": reply["media_url"], "error_code": code, "http_status": refused.http_status,
            "error": refused.message, "reason": reason, "attempts": reply["attempts"], "failed_at": time.time(),
        })
    next_head = _finish(redis, conversation, head, "failed", error_code=code)
    TALLY.incr("sms_outbound", result="failed", code=code or refused.http_status or "none")
    log.warning("outbound.failed", bot_id=reply["bot_id"], conversation=conversation, reply_id=reply["id"],
                code=code, http_status=refused.http_status, reason=reason, attempts=reply["attempts"],
                error=refused.message, hint=HINTS.get(code or 0))
    return Step(kick=next_head)


# --- The outbox, the reply records and the log. ---

# Finish the head if it is still `reply_id`: pop it, drop its record, hand the log its outcome;
# then note progress for the sweeper (a next head) or settle (none left; not for deliver_now,
# whose drain settles as it lets go); confirm the pace and let the lease go when asked; and for
# deliver_taken, let the conversation's lease go too when no message waits (and settle). One step,
# so no kick is lost between two workers. Returns {the next head, whether the conversation was let go}.
# KEYS: outbox, replies, pending, log outbox, inbox, processing, pace hash, outbox lease,
#       conversation lease.
# ARGV: reply id, conversation, now, outcome record, settle ('1' or ''), then the pace's bare
#       interval and ttl ('' '': no confirm), then the outbox lease's token ('': keep it), then the
#       conversation lease's token ('': not this step's to let go).
FINISH_LUA = CONFIRM_FUNCTION + with_constants("""
if ARGV[6] ~= '' then confirm(KEYS[7], ARGV[6], ARGV[7]) end
-- The head and the one after it, taken off and the one after put back: one command for the usual
-- outbox of one reply. Another reply at the head is not this step's: both go back as they were.
local first = redis.call('LPOP', KEYS[1], 2) or {}
local head = first[1]
if head == ARGV[1] then
  if first[2] then redis.call('LPUSH', KEYS[1], first[2]) end
  redis.call('HDEL', KEYS[2], ARGV[1], ARGV[1] .. '__SENDING__', ARGV[1] .. '__SID__')
  redis.call('RPUSH', KEYS[4], ARGV[4])
  head = first[2]
elseif first[2] then
  redis.call('LPUSH', KEYS[1], first[2], head)  -- LPUSH puts the last value first
elseif head then
  redis.call('LPUSH', KEYS[1], head)
end
-- The leases' holders, read at once when both are asked about (they share a hash tag).
local held = {}
if ARGV[9] ~= '' then held = redis.call('MGET', KEYS[8], KEYS[9])
elseif ARGV[8] ~= '' then held[1] = redis.call('GET', KEYS[8]) end
local released, let_go, idle = {}, 0, nil
if ARGV[8] ~= '' and held[1] == ARGV[8] then released[1] = KEYS[8] end
if ARGV[9] == '' then
  if ARGV[5] ~= '' then idle = redis.call('LLEN', KEYS[5]) + redis.call('LLEN', KEYS[6]) == 0 end
-- While the conversation is ours its processing list is empty: the step that queued this reply
-- finished the message, and only the lease's holder moves another there.
elseif held[2] == ARGV[9] and redis.call('LLEN', KEYS[5]) == 0 then
  released[#released + 1] = KEYS[9]
  let_go, idle = 1, true
end
if #released > 0 then redis.call('DEL', unpack(released)) end
if head then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
elseif idle and (ARGV[5] ~= '' or let_go == 1) then
  redis.call('ZREM', KEYS[3], ARGV[2])
end
return {head or false, let_go}
""", SENDING=SENDING_SUFFIX, SID=CALLBACK_SUFFIX)

SAVE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
"""


def _finish(redis: Any, conversation: str, head: Head, status: str, sid: str | None = None,
            error_code: int | None = None, at: float | None = None, lease: Lease | None = None,
            pace: tuple[str, int, float] | None = None) -> str | None:
    """Take the head off the outbox with the message log's record of how it ended (in the same
    step: worker.logdrain); with `pace` (number, segments, rate) confirm the send's pace, with
    `lease` let it go; with the head's `lets_go`, let the conversation go if no message waits.
    Returns the next head, to kick, if any."""
    pace_args = pacing.confirm_args(pace[1], pace[2]) if pace else ["", ""]
    if lease is not None:
        lease.forget()  # released by the script, after the outcome is recorded
    ours = head.lets_go is not None and head.lets_go.held and not head.lets_go.lost
    conversation_lease = head.lets_go if ours else None
    if conversation_lease is not None:
        conversation_lease.forget()  # not renewed meanwhile: the renewer must not count it lost
    let_go = 0
    try:
        next_head, let_go = script(redis, FINISH_LUA)(
            keys=[keys.outbox(conversation), keys.replies(conversation), keys.PENDING, keys.LOG_OUTBOX,
                  keys.inbox(conversation), keys.processing(conversation),
                  keys.pace(pace[0]) if pace else keys.outbox(conversation), keys.outbox_lock(conversation),
                  conversation_lease.key if conversation_lease is not None else keys.outbox_lock(conversation)],
            args=[head.id, conversation, repr(time.time()), outcome_record(head.id, status, sid, error_code, at),
                  "1" if head.settles else "", *pace_args, lease.token if lease is not None else "",
                  conversation_lease.token if conversation_lease is not None else ""],
        )
    finally:
        if conversation_lease is not None and not let_go:
            # A message waits (or the step failed): the drain goes on, and lets go as before.
            conversation_lease.granted(True)
    return next_head or None


def _save(redis: Any, reply: dict[str, Any]) -> None:
    script(redis, SAVE_LUA)(keys=[keys.replies(reply["conversation"])],
                            args=[reply["id"], stored(reply)])
