"""The message model both sides share, and the two steps that move work between them atomically:
the webhook accepting an inbound message, and replies joining a conversation's outbox."""

from __future__ import annotations

import json
from dataclasses import dataclass
import time
import uuid
from typing import Any

from marshmallow import EXCLUDE, Schema, fields, validate

from shared import keys, metrics
from shared.bots import Limits
from shared.redis import script, with_constants
from shared.segments import count_segments, split_message
from shared.tasks import CONVERSATIONS_QUEUE, HANDLE_CONVERSATION
from shared.optout import LIVE, MESSAGE, OPT_IN, OPT_OUT

DEDUPE_TTL = 48 * 3600


class MediaSchema(Schema):
    url = fields.String(required=True)
    content_type = fields.String(load_default=None)


class InboundMessageSchema(Schema):
    """An inbound SMS as the webhook hands it to the worker (and the worker to the engine)."""

    class Meta:
        unknown = EXCLUDE

    sid = fields.String(required=True)
    bot_id = fields.Integer(required=True)
    sender = fields.String(required=True)
    to = fields.String(required=True)
    body = fields.String(load_default="")
    media = fields.List(fields.Nested(MediaSchema), load_default=list)
    num_segments = fields.Integer(load_default=1)
    location = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)
    opt_out_type = fields.String(load_default=None, allow_none=True)
    event = fields.String(load_default=MESSAGE, validate=validate.OneOf([MESSAGE, OPT_OUT, OPT_IN]))
    received_at = fields.Float(required=True)


class ReplySchema(Schema):
    """One reply on its way out: what the engine said, and the sending state the worker keeps."""

    class Meta:
        unknown = EXCLUDE

    id = fields.String(required=True)
    conversation = fields.String(required=True)
    bot_id = fields.Integer(required=True)
    to = fields.String(required=True)
    text = fields.String(load_default="")
    media_url = fields.String(load_default=None, allow_none=True)
    in_reply_to = fields.String(load_default=None, allow_none=True)
    received_at = fields.Float(load_default=None, allow_none=True)
    created_at = fields.Float(required=True)
    attempts = fields.Integer(load_default=0)
    first_attempt_at = fields.Float(load_default=None, allow_none=True)
    not_before = fields.Float(load_default=None, allow_none=True)
    slot_at = fields.Float(load_default=None, allow_none=True)
    sid = fields.String(load_default=None, allow_none=True)
    error_code = fields.Integer(load_default=None, allow_none=True)
    # The bot's number it goes from: the one the person texted (None: see worker.outbound.route_of).
    from_number = fields.String(load_default=None, allow_none=True)


INBOUND = InboundMessageSchema()
REPLY = ReplySchema()
# What a stored inbound message (INBOUND's shape, written by accept_inbound) may leave out.
_INBOUND_DEFAULTS: dict[str, Any] = {"body": "", "num_segments": 1, "opt_out_type": None, "event": MESSAGE}


def inbound_from(raw: str) -> dict[str, Any]:
    """A stored inbound message, read back. accept_inbound stores INBOUND's shape, so this fills in
    defaults rather than run marshmallow's load on every message; the lists and dicts are new
    objects of their own, as a load would make them."""
    message = {**_INBOUND_DEFAULTS, **json.loads(raw)}
    message["media"] = list(message.get("media") or [])
    message["location"] = dict(message.get("location") or {})
    return message

# Deduplicate, record opt-out/opt-in, queue on the conversation, count it and, when the inbox
# was empty, wake a worker: one step, so a crash can neither lose an acknowledged message, nor
# let a retry of it be processed twice, nor leave it queued with nobody woken for it.
# A worker draining a conversation looks at its inbox again as it lets go of it (in the step that
# lets go, or right after it), so only a message that finds the inbox empty and the conversation
# nobody's needs a wake-up: a burst of thirty texts wakes one worker, not thirty that would queue
# for the same lease, and a text landing while its conversation is answered wakes nobody (a worker
# woken then would find the lease taken and go away). A holder that dies leaves it to the sweeper.
# KEYS: seen(account, MessageSid), seen(account, idempotency token), inbox, pending, opt-out copy, metric counters,
#       the wake-ups (shared.wakeups), the number the person last texted (keys.texted), the conversation's lease,
#       when the person last texted (keys.wrote).
# ARGV: message, conversation, its time of arrival, event, sender, the wake-up's message id, the number
#       texted ('': not kept, the bot has one number).
ACCEPT_LUA = """
-- Marking the token seen even when the MessageSid turns out to be a duplicate changes nothing:
-- a request carrying either again is a duplicate anyway.
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', __DEDUPE_TTL__)
    or (KEYS[1] ~= KEYS[2] and not redis.call('SET', KEYS[1], '1', 'NX', 'EX', __DEDUPE_TTL__)) then
  redis.call('HINCRBY', KEYS[6], '__DUPLICATE__', 1)
  return 0
end
if ARGV[4] == '__OPT_OUT__' then redis.call('HSET', KEYS[5], ARGV[5], '__LIVE__')
elseif ARGV[4] == '__OPT_IN__' then redis.call('HDEL', KEYS[5], ARGV[5]) end
redis.call('ZADD', KEYS[4], 'NX', ARGV[3], ARGV[2])
redis.call('HINCRBY', KEYS[6], '__ACCEPTED__', 1)
redis.call('SET', KEYS[10], ARGV[3], 'EX', __DEDUPE_TTL__)
if ARGV[7] ~= '' then redis.call('SET', KEYS[8], ARGV[7], 'EX', __DEDUPE_TTL__) end
if redis.call('RPUSH', KEYS[3], ARGV[1]) == 1 and redis.call('EXISTS', KEYS[9]) == 0 then
  -- A dramatiq message, as Message.encode writes it (spelled out: cjson may render {} as []).
  redis.call('RPUSH', KEYS[7], '{"queue_name":"__QUEUE__","actor_name":"__ACTOR__","args":['
    .. cjson.encode(ARGV[2]) .. '],"kwargs":{},"options":{},"message_id":' .. cjson.encode(ARGV[6])
    .. ',"message_timestamp":' .. string.format('%d', math.floor(tonumber(ARGV[3]) * 1000)) .. '}')
end
return 1
"""
ACCEPT_LUA = with_constants(
    ACCEPT_LUA, DUPLICATE=metrics.field("sms_inbound", result="duplicate"),
    ACCEPTED=metrics.field("sms_inbound", result="accepted"), DEDUPE_TTL=DEDUPE_TTL, OPT_OUT=OPT_OUT, OPT_IN=OPT_IN,
    LIVE=LIVE,
    QUEUE=CONVERSATIONS_QUEUE, ACTOR=HANDLE_CONVERSATION,
)


def accept_inbound(redis: Any, message: dict[str, Any], idempotency_token: str | None = None,
                   account_sid: str | None = None, remember_texted: bool = False, opt_out_key: str | None = None) -> bool:
    """Queue an inbound message on its conversation; False if it was seen in the last 48 hours.

    One EVALSHA: dedupe, storing and the worker's wake-up are one Lua step and one round trip.
    `message` is INBOUND's shape already (the webhook builds it field by field), so it is stored
    as JSON without a marshmallow dump; the worker loads it through INBOUND. With `remember_texted`
    (a bot with several numbers or a messaging service), the number texted is kept for the sends
    that answer no inbound of their own (worker.outbound). A STOP or START is kept under
    `opt_out_key` (the bot's, shared.bots.Bot.opt_out_key), by default the number texted.
    """
    conversation = keys.conversation_id(message["bot_id"], message["sender"])
    # The webhook passes the verified account; callers without one get the bot's own scope.
    account = account_sid or f"bot-{message['bot_id']}"
    seen_sid = keys.seen(account, message["sid"])
    seen_token = keys.seen(account, idempotency_token) if idempotency_token else seen_sid
    return bool(script(redis, ACCEPT_LUA)(
        keys=[seen_sid, seen_token, keys.inbox(conversation), keys.PENDING, keys.opted_out(opt_out_key or message["to"]),
              keys.METRIC_COUNTERS, keys.WAKE_UPS, keys.texted(conversation), keys.conversation_lock(conversation),
              keys.wrote(conversation)],
        # The wake-up is named after the message that caused it, which is unique once accepted.
        args=[json.dumps(message), conversation, repr(message["received_at"]), message["event"], message["sender"],
              f"wake-{message['sid']}", message["to"] if remember_texted else ""],
    ))


# Add replies to the outbox in order, optionally finishing the inbound message that produced
# them; returns the id to kick when the outbox was idle, so exactly one kick starts a chain of
# sends whoever else is adding or removing replies; FENCED (-1), doing nothing, when the caller's
# conversation lease is no longer its own; ERASED (-2), doing nothing, when the inbound to finish
# is no longer being processed: its conversation was erased while the engine was asked (nothing
# of it may be sent or logged after the erase). A function, so the worker's step can go on to take
# the first reply's turn (worker.conversation).
# queue(outbox, reply records, processing, pending, log outbox, conversation lease,
#       the inbound to finish (or ''), conversation, now, log record (or ''), lease token (or ''),
#       where in ARGV the (id, reply) pairs start)
QUEUE_FUNCTION = """
local function queue(outbox, records, processing, pending, log, lock, done, conversation, now, record, token, first)
  if token ~= '' and redis.call('GET', lock) ~= token then return -1 end
  if done ~= '' and redis.call('LREM', processing, 1, done) == 0 then return -2 end
  if record ~= '' then redis.call('RPUSH', log, record) end
  if #ARGV < first then return false end
  local queued = 0
  for i = first, #ARGV - 1, 2 do
    redis.call('HSET', records, ARGV[i], ARGV[i + 1])
    queued = redis.call('RPUSH', outbox, ARGV[i])
  end
  redis.call('ZADD', pending, now, conversation)
  -- The outbox was idle if it holds only what was just queued.
  if queued == (#ARGV - first + 1) / 2 then return ARGV[first] end
  return false
end
"""
# KEYS: outbox, reply records, processing, pending, log outbox, conversation lease.
# ARGV: the inbound to finish, conversation, now, log record, lease token, then (id, reply)s.
QUEUE_REPLIES_LUA = QUEUE_FUNCTION + """
return queue(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 6)
"""


def new_reply(conversation: str, to: str, text: str, media_url: str | None = None,
              in_reply_to: str | None = None, received_at: float | None = None) -> dict[str, Any]:
    """A reply in REPLY's shape, built directly: every message's replies are made here, and
    marshmallow's load costs more than the rest of building them (REPLY reads stored ones)."""
    bot_id, _ = keys.split_conversation_id(conversation)
    return {
        "id": uuid.uuid4().hex, "conversation": conversation, "bot_id": bot_id, "to": to, "text": text,
        "media_url": media_url, "in_reply_to": in_reply_to, "received_at": received_at, "created_at": time.time(),
        "attempts": 0, "first_attempt_at": None, "not_before": None, "slot_at": None, "sid": None, "error_code": None,
    }


def stored(reply: dict[str, Any]) -> str:
    """A reply as its record in Redis: REPLY's fields, as JSON (a plain dump: they are JSON already)."""
    return json.dumps({name: reply.get(name) for name in _REPLY_FIELDS})


_REPLY_FIELDS = tuple(REPLY.fields)


def replies_from(conversation: str, to: str, text: str | None, media_url: str | None = None,
                 in_reply_to: str | None = None, received_at: float | None = None) -> list[dict[str, Any]]:
    """One engine answer as replies ready to queue: text over 1600 characters becomes several
    messages, in order; an image rides on the last one."""
    parts = split_message(text or "") if text else []
    if not parts and not media_url:
        return []
    parts = parts or [""]
    return [
        new_reply(conversation, to, part, media_url if index == len(parts) - 1 else None, in_reply_to, received_at)
        for index, part in enumerate(parts)
    ]


# What queue_replies answers when the caller's conversation lease is no longer its own, and when
# the message it was to finish was erased meanwhile.
FENCED, ERASED = -1, -2

# Beside each reply's record in the conversation's replies hash: when a send of it was claimed
# (its outcome unknown until it is finished), and the MessageSid a status callback named for it.
SENDING_SUFFIX, CALLBACK_SUFFIX = "#sending", "#sid"


def sending_field(reply_id: str) -> str:
    return reply_id + SENDING_SUFFIX


def callback_field(reply_id: str) -> str:
    return reply_id + CALLBACK_SUFFIX


# KEYS: the replies hash. ARGV: the reply's sending field, its callback field, the MessageSid.
# Only a reply whose send is under way (or unknown) takes it: a late callback for a finished
# reply leaves nothing behind.
NOTE_CALLBACK_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 1
"""


def note_callback(redis: Any, conversation: str, reply_id: str, sid: str) -> bool:
    """A status callback named `reply_id`: tell its sender (worker.outbound) the MessageSid Twilio
    gave it, in case the answer to the send was lost. Whether the reply was waiting for it."""
    return bool(script(redis, NOTE_CALLBACK_LUA)(keys=[keys.replies(conversation)],
                                                 args=[sending_field(reply_id), callback_field(reply_id), sid]))


# A reply Twilio accepted and then could not queue (30001, a Messaging Service's 21611, told by
# status callback) is sent again by a worker (worker.outbound.resend_reply) after a slow backoff, as
# a new reply `<id>~<n>` at the end of its conversation; after MAX_RESENDS it is a dead letter.
RESEND_MARK, MAX_RESENDS = "~", 6


def resend_attempt(reply_id: str) -> tuple[str, int]:
    """The first reply's id, and which resend sending `reply_id` again would be (1 for the first)."""
    first, mark, done = reply_id.rpartition(RESEND_MARK)
    if not mark or not done.isdigit():
        return reply_id, 1
    return first, int(done) + 1


# What one engine answer may send by default: more is cut (and logged), so one inbound text can
# never run up unbounded SMS. Each bot's own are its max-replies and max-segments (shared.bots.Limits).
MAX_REPLIES_PER_ANSWER = Limits.max_replies
MAX_SEGMENTS_PER_ANSWER = Limits.max_segments
ELLIPSIS = "..."  # GSM-7: "…" would turn the whole message into UCS-2, half the text per segment


@dataclass(frozen=True)
class Capped:
    """An answer's replies after the caps, and what was cut."""

    replies: list[dict[str, Any]]
    replies_cut: int
    truncated: bool


def capped(replies: list[dict[str, Any]], max_replies: int = MAX_REPLIES_PER_ANSWER,
           max_segments: int = MAX_SEGMENTS_PER_ANSWER) -> Capped:
    """At most `max_replies` replies and `max_segments` segments in all, in order; the reply that
    crosses the segment budget is cut at a word, with an ellipsis, and nothing after it is sent."""
    kept: list[dict[str, Any]] = []
    left = max_segments
    for reply in replies[:max_replies]:
        segments = count_segments(reply["text"]) if reply["text"] else 1
        if segments <= left:
            kept.append(reply)
            left -= segments
            continue
        if left > 0 and reply["text"]:
            kept.append({**reply, "text": _cut(reply["text"], left)})
        return Capped(kept, len(replies) - len(kept), True)
    return Capped(kept, len(replies) - len(kept), False)


def _cut(text: str, segments: int) -> str:
    """The longest start of `text` ending at a word, plus an ellipsis, that fits in `segments`."""
    words = text.split(" ")
    low, high = 0, len(words)  # the answer is a number of whole words: search it
    while low < high:
        middle = (low + high + 1) // 2
        if count_segments(" ".join(words[:middle]) + ELLIPSIS) <= segments:
            low = middle
        else:
            high = middle - 1
    if low:
        return " ".join(words[:low]) + ELLIPSIS
    head = text  # one word longer than the budget: cut it by characters
    while head and count_segments(head + ELLIPSIS) > segments:
        head = head[: len(head) * 9 // 10]
    return head + ELLIPSIS


def queue_replies(redis: Any, conversation: str, replies: list[dict[str, Any]], done_inbound: str | None = None,
                  log_record: str | None = None, lease_token: str | None = None) -> str | int | None:
    """Queue replies in order; returns the reply id a worker must be kicked for, if any. The
    message log's record of this step (`log_record`, see worker.logdrain) joins the log outbox in
    the same step, so the log can neither miss nor repeat it; callers without one (a replay, an
    operator's send) write their rows to the database first; an engine's callback uses push_replies.

    With `lease_token`, the step happens only while the conversation's lease still holds that
    token (fencing): a worker that lost its lease (a long pause) queues nothing, and gets FENCED."""
    leading, pairs = queue_args(conversation, replies, done_inbound, log_record, lease_token)
    return script(redis, QUEUE_REPLIES_LUA)(keys=queue_keys_of(conversation), args=leading + pairs)


def queue_keys_of(conversation: str) -> list[str]:
    """QUEUE_FUNCTION's keys, in its order."""
    return [keys.outbox(conversation), keys.replies(conversation), keys.processing(conversation), keys.PENDING,
            keys.LOG_OUTBOX, keys.conversation_lock(conversation)]


def queue_args(conversation: str, replies: list[dict[str, Any]], done_inbound: str | None = None,
               log_record: str | None = None, lease_token: str | None = None) -> tuple[list[Any], list[Any]]:
    """QUEUE_FUNCTION's leading arguments, and the (id, reply) pairs that go last."""
    pairs: list[Any] = []
    for reply in replies:
        pairs += [reply["id"], stored(reply)]
    return [done_inbound or "", conversation, repr(time.time()), log_record or "", lease_token or ""], pairs


# An engine's push (webhook.replies), for every recipient at once: refused whole, queuing nothing,
# when the bot's pushes today would pass its max-messages-per-day (more could not be sent today
# anyway, and it bounds what one bot's pushes hold in Redis), a recipient's outbox would hold more
# than the bot's max-queued-replies or the person had max-replies-per-minute this minute (direct
# answers count there too); else each recipient's replies join the outbox, count toward the
# minute and the day, and the log's record joins the log outbox.
# KEYS: pending, log outbox, the day's pushes, then per recipient: outbox, replies hash, replies this minute.
# ARGV: now, the bot's id, max queued, max per minute (0: none), recipients, then per recipient its
#       conversation and reply count, then per recipient its log record and its (id, reply) pairs;
#       the last: max per day (0: none).
# Returns {1, the id to kick or '' per recipient}, or {0, the recipient at fault (0: all), 'day' |
# 'queued' | 'minute', its outbox length}.
PUSH_LUA = """
local recipients = tonumber(ARGV[5])
local total = 0
for i = 1, recipients do total = total + tonumber(ARGV[5 + 2 * i]) end
local per_day = tonumber(ARGV[#ARGV])
if per_day > 0 and tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0') + total > per_day then
  return {0, 0, 'day', 0}
end
for i = 1, recipients do
  local n, waiting = tonumber(ARGV[5 + 2 * i]), redis.call('LLEN', KEYS[3 * i + 1])
  if waiting + n > tonumber(ARGV[3]) then return {0, i, 'queued', waiting} end
  if ARGV[4] ~= '0' and tonumber(redis.call('GET', KEYS[3 * i + 3]) or '0') >= tonumber(ARGV[4]) then
    return {0, i, 'minute', waiting}
  end
end
local heads, at = {1}, 6 + 2 * recipients
for i = 1, recipients do
  local n, length = tonumber(ARGV[5 + 2 * i]), 0
  redis.call('RPUSH', KEYS[2], ARGV[at])
  at = at + 1
  for j = 0, n - 1 do
    redis.call('HSET', KEYS[3 * i + 2], ARGV[at + 2 * j], ARGV[at + 2 * j + 1])
    length = redis.call('RPUSH', KEYS[3 * i + 1], ARGV[at + 2 * j])
  end
  heads[i + 1] = length == n and ARGV[at] or ''
  at = at + 2 * n
  if redis.call('INCRBY', KEYS[3 * i + 3], n) == n then redis.call('EXPIRE', KEYS[3 * i + 3], 120) end
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4 + 2 * i])
end
if redis.call('HINCRBY', KEYS[3], ARGV[2], total) == total then redis.call('EXPIRE', KEYS[3], 172800) end
return heads
"""


@dataclass(frozen=True)
class Pushed:
    """What push_replies did: the reply id to kick per conversation whose outbox was idle, or why it
    was refused ('day': max-messages-per-day, 'queued': max-queued-replies, 'minute':
    max-replies-per-minute) and for which recipient's conversation (None: the day's, for all)."""

    kicks: dict[str, str]
    refused_for: str | None = None
    reason: str | None = None
    waiting: int = 0


def push_replies(redis: Any, grouped: dict[str, list[dict[str, Any]]], log_records: dict[str, str],
                 limits: Limits) -> Pushed:
    """Queue an engine's pushed replies, grouped by conversation, in one step with each conversation's
    log record, or nothing at all (see PUSH_LUA). The database is written only from the log outbox,
    so work that Redis refuses leaves nothing behind."""
    conversations_ = [conversation for conversation, replies in grouped.items() if replies]
    if not conversations_:
        return Pushed({})
    bot_id = keys.split_conversation_id(conversations_[0])[0]
    keys_ = [keys.PENDING, keys.LOG_OUTBOX, keys.daily_pushes(time.strftime("%Y%m%d", time.gmtime()))]
    counts: list[Any] = []
    pairs: list[Any] = []
    for conversation in conversations_:
        keys_ += [keys.outbox(conversation), keys.replies(conversation), keys.replies_this_minute(conversation)]
        counts += [conversation, len(grouped[conversation])]
        pairs.append(log_records[conversation])
        for reply in grouped[conversation]:
            pairs += [reply["id"], stored(reply)]
    done = script(redis, PUSH_LUA)(keys=keys_, args=[
        repr(time.time()), bot_id, limits.max_queued_replies, limits.max_replies_per_minute,
        len(conversations_), *counts, *pairs, limits.max_messages_per_day])
    if done[0] == 0:
        _, index, reason, waiting = done
        return Pushed({}, conversations_[int(index) - 1] if int(index) else None, reason, int(waiting))
    return Pushed({conversation: head for conversation, head in zip(conversations_, done[1:]) if head})


# Forget a conversation in the pending set once it has nothing left to do.
SETTLE_LUA = """
if redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3]) == 0 then
  return redis.call('ZREM', KEYS[4], ARGV[1])
end
return 0
"""


def settle(redis: Any, conversation: str) -> bool:
    """Drop the conversation from the pending set if its inbox, processing list and outbox are empty.

    `redis` may be a pipeline (the workers batch this with the step that emptied a list), hence
    EVAL: a registered script would cost the pipeline a SCRIPT EXISTS round trip."""
    return bool(redis.eval(SETTLE_LUA, 4, keys.inbox(conversation), keys.processing(conversation),
                           keys.outbox(conversation), keys.PENDING, conversation))


def reschedule(redis: Any, conversation: str, at: float) -> None:
    """Tell the sweeper when this conversation is next expected to make progress."""
    redis.zadd(keys.PENDING, {conversation: at})
