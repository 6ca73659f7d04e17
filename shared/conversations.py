"""The message model both sides share, and the two steps that move work between them atomically:
the webhook accepting an inbound message, and replies joining a conversation's outbox."""

from __future__ import annotations

import json
from dataclasses import dataclass
import time
import uuid
from typing import Any

from marshmallow import EXCLUDE, Schema, fields, validate

from shared import jsonio, keys, metrics
from shared.bots import Limits
from shared.redis import script, with_constants
from shared.segments import count_segments, split_message
from shared.tasks import CONVERSATIONS_QUEUE, HANDLE_CONVERSATION
from shared.optout import HELP, LIVE, MESSAGE, OPT_IN, OPT_OUT

DEDUPE_TTL = 48 * 3600
# More than any two webhooks' clocks can differ by: a text a lagging webhook stamps before a bucket's
# start reaches Redis within this long after it (ACCEPT_LUA).
MARK_CLOCK_SLACK_SECONDS = 3600


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
    event = fields.String(load_default=MESSAGE, validate=validate.OneOf([MESSAGE, OPT_OUT, OPT_IN, HELP]))
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
    # The confirmation of the opt-out it follows (the bot's opt-out-message): sent though the person opted out.
    confirms_opt_out = fields.Boolean(load_default=None, allow_none=True)


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
# A mark's time: 4 bytes, big-endian Unix seconds, read and written byte by byte (fakeredis, which
# `mammut-sms dev` runs on, has no struct library).
MARK_TIME_LUA = """
local function time_of(value)
  local a, b, c, d = string.byte(value, 1, 4)
  return ((a * 256 + b) * 256 + c) * 256 + d
end
local function packed(t)
  return string.char(math.floor(t / 16777216) % 256, math.floor(t / 65536) % 256, math.floor(t / 256) % 256, t % 256)
end
"""
# Marks are a field per conversation in hashes per 6 hours (keys.MARKS): the time the person last
# texted (the push window's, webhook.replies) and the digests of the MessageSids and idempotency
# tokens their texts carried. A retry is found in its conversation's field of the 9 hashes that can
# hold the last 48 hours, unless the field's time says its last text is older than that (so a mark
# is recognised at least 48 hours, and at most the 6 more its bucket may hold it). The field of the
# current bucket also says in which of the 8 older buckets the conversation had a field when it was
# written (keys.MARK_SLOT): a text after the first of its bucket looks in those only, not in all nine,
# and in the previous bucket (where a webhook whose clock lags may still be writing) while the field
# has not been written MARK_CLOCK_SLACK_SECONDS into its bucket. The previous
# releases' marks are read until they expire (keys.seen and keys.SEEN_HOURS while LegacyMarks says
# some may be left; fields without the slot as they are met); and the previous release, during a
# rolling deploy, reads this one's fields rightly. The hashes looked in are named here from the hour
# of arrival rather than passed, their names being most of a request otherwise.
# KEYS: seen(account, MessageSid), seen(account, idempotency token) (the marks' earliest shape, read
#       until they expire), inbox, pending, opt-out copy, the wake-ups (shared.wakeups), the number
#       the person last texted (keys.texted), the conversation's lease.
# ARGV: message, conversation, its time of arrival, event, sender, the wake-up's message id, the number
#       texted ('': not kept, the bot has one number), the previous release's fields (keys.seen_field)
#       of the MessageSid and the idempotency token (the same when there is none), the hour of
#       arrival, the conversation's field (keys.mark_field), the digests (keys.mark_digest) of the
#       MessageSid and the idempotency token (the same when there is none), '1' to read the earlier
#       releases' marks ('' once none can be left, see LegacyMarks).
ACCEPT_LUA = MARK_TIME_LUA + """
local hour = tonumber(ARGV[10])
local function bucket(h) return h - h % __BUCKET__ end
local firsts = {}  -- the first hours of the buckets that can hold the last 48 hours, newest first
for first = bucket(hour), bucket(hour - __HOURS__), -__BUCKET__ do firsts[#firsts + 1] = first end
-- The earlier releases' marks, read only while some may be left (ARGV[14], LegacyMarks): a key per
-- MessageSid or token (keys.seen), and a field per MessageSid or token in SEEN_HOURS, its value the hour.
local function seen(field)
  for _, first in ipairs(firsts) do
    local made = redis.call('HGET', '__SEEN_HOURS__' .. first, field)
    if made and hour - tonumber(made) <= __HOURS__ then return true end
  end
  return false
end
local function seen_before()
  if ARGV[14] ~= '1' then return false end
  local names = {KEYS[1], KEYS[2]}
  for _, first in ipairs(firsts) do names[#names + 1] = '__SEEN_HOURS__' .. first end
  if redis.call('EXISTS', unpack(names)) == 0 then return false end  -- none of either shape is left
  return redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 or seen(ARGV[9]) or (ARGV[8] ~= ARGV[9] and seen(ARGV[8]))
end
-- Where a value's digests start: after the time, and after the slot of the older buckets' byte
-- when it has one (the previous release's values have none; to that release, the slot reads as
-- one more digest, which no text's equals).
local function has_slot(value) return string.sub(value, 5, __SLOT_END__) == '__SLOT__' end
local function digests_at(value)
  if has_slot(value) then return __DIGESTS_AT__ end
  return 5
end
-- Whether `digest` is one of the value's: found at a digest's place (__DIGEST__ bytes apart).
local function holds(value, digest)
  local start = digests_at(value)
  local at = string.find(value, digest, start, true)
  while at and (at - start) % __DIGEST__ ~= 0 do at = string.find(value, digest, at + 1, true) end
  return at ~= nil
end
local function is_retry(value)
  -- 0: erased (shared.erasure), the digests kept: they are as old as their bucket says.
  local wrote = time_of(value)
  return (wrote == 0 or hour - math.floor(wrote / 3600) <= __HOURS__)
      and (holds(value, ARGV[12]) or (ARGV[13] ~= ARGV[12] and holds(value, ARGV[13])))
end
local current = redis.call('HGET', '__MARKS__' .. firsts[1], ARGV[11])  -- the field in this hour's hash
-- The older buckets with a field of the conversation: bit i-2 for firsts[i]. Those the current field
-- names, when it names them; then each found now.
local older, known = 0, current and has_slot(current)
if known then older = string.byte(current, __DIGESTS_AT__ - 1) end
-- The bucket just before is looked in too (a webhook whose clock lags may still be writing there)
-- until the current field is written __SLACK__ seconds into its bucket: no clock lags that much, and
-- each write of the field looked there and named it if it was found, so the byte is whole by then.
local settled = known and time_of(current) >= firsts[1] * 3600 + __SLACK__
local function marked()
  if current and is_retry(current) then return true end
  for i = 2, #firsts do
    local bit = 2 ^ (i - 2)
    local named = math.floor(older / bit) % 2 == 1
    if not known or (i == 2 and not settled) or named then
      local value = redis.call('HGET', '__MARKS__' .. firsts[i], ARGV[11])
      if value then
        if is_retry(value) then return true end
        if not named then older = older + bit end
      end
    end
  end
  return false
end
if marked() or seen_before() then return 0 end
-- A request carrying either again is a duplicate; the time is the latest text's (clocks may differ
-- by a little between webhooks). The hash lives until its last hour's marks are 48 hours old.
local marks, now = '__MARKS__' .. bucket(hour), math.floor(tonumber(ARGV[3]))
local digests = ARGV[12] .. (ARGV[13] ~= ARGV[12] and ARGV[13] or '')
if current then
  now = math.max(now, time_of(current))
  digests = string.sub(current, digests_at(current)) .. digests
end
-- A field already there was written by this step, which set the hash's expiry then.
if redis.call('HSET', marks, ARGV[11], packed(now) .. '__SLOT__' .. string.char(older) .. digests) == 1 then
  redis.call('EXPIREAT', marks, (bucket(hour) + __BUCKET__ + __HOURS__) * 3600)
end
if ARGV[4] == '__OPT_OUT__' then redis.call('HSET', KEYS[5], ARGV[5], '__LIVE__')
elseif ARGV[4] == '__OPT_IN__' then redis.call('HDEL', KEYS[5], ARGV[5]) end
redis.call('ZADD', KEYS[4], 'NX', ARGV[3], ARGV[2])
if ARGV[7] ~= '' then redis.call('SET', KEYS[7], ARGV[7], 'EX', __DEDUPE_TTL__) end
if redis.call('RPUSH', KEYS[3], ARGV[1]) == 1 and redis.call('EXISTS', KEYS[8]) == 0 then
  -- A dramatiq message, as Message.encode writes it (spelled out: cjson may render {} as []).
  redis.call('RPUSH', KEYS[6], '{"queue_name":"__QUEUE__","actor_name":"__ACTOR__","args":['
    .. cjson.encode(ARGV[2]) .. '],"kwargs":{},"options":{},"message_id":' .. cjson.encode(ARGV[6])
    .. ',"message_timestamp":' .. string.format('%d', math.floor(tonumber(ARGV[3]) * 1000)) .. '}')
end
return 1
"""
# One byte names the older buckets: there must be no more than 8. Its slot is a digest's size.
assert DEDUPE_TTL // 3600 // keys.SEEN_BUCKET_HOURS <= 8
assert len(keys.MARK_SLOT) + 1 == keys.MARK_DIGEST_BYTES and keys.MARK_SLOT.isascii() and "'" not in keys.MARK_SLOT
ACCEPT_LUA = with_constants(
    ACCEPT_LUA, DEDUPE_TTL=DEDUPE_TTL, OPT_OUT=OPT_OUT, OPT_IN=OPT_IN,
    HOURS=DEDUPE_TTL // 3600, SEEN_HOURS=keys.SEEN_HOURS, BUCKET=keys.SEEN_BUCKET_HOURS, MARKS=keys.MARKS,
    DIGEST=keys.MARK_DIGEST_BYTES, SLOT=keys.MARK_SLOT, SLOT_END=4 + len(keys.MARK_SLOT),
    DIGESTS_AT=5 + keys.MARK_DIGEST_BYTES, SLACK=MARK_CLOCK_SLACK_SECONDS,
    LIVE=LIVE,
    QUEUE=CONVERSATIONS_QUEUE, ACTOR=HANDLE_CONVERSATION,
)


class LegacyMarks:
    """Whether the marks of the earlier shapes (keys.seen, keys.SEEN_HOURS) may still be in Redis,
    so ACCEPT_LUA must look for them: until keys.LEGACY_MARKS_UNTIL. The first process of this release
    to find that missing (an upgrade, or a Redis that lost it) sets it LEGACY_HOURS ahead, long enough
    for the marks that earlier processes write until the deploy is over to expire; `migrate
    --from-redis`, which writes seen keys, pushes it on (extend). Each process reads it again every
    RECHECK_SECONDS, and a Redis error reads as "look": never a missed duplicate for a saved lookup."""

    # The marks' 48 hours, the 6 more a bucket holds them, and 6 for a rolling deploy to finish.
    LEGACY_HOURS = DEDUPE_TTL // 3600 + 12
    RECHECK_SECONDS = 60.0

    def __init__(self) -> None:
        self._until = float("inf")
        self._checked_at = float("-inf")

    def forget(self) -> None:
        """Read the key again at the next look (a test's fresh Redis)."""
        self._until, self._checked_at = float("inf"), float("-inf")

    def present(self, redis: Any, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now - self._checked_at >= self.RECHECK_SECONDS:
            # Before the read, so a slow or failing Redis is asked once a period, not by every request.
            self._checked_at = now
            try:
                pipe = redis.pipeline(transaction=False)
                pipe.set(keys.LEGACY_MARKS_UNTIL, int(now) + self.LEGACY_HOURS * 3600, nx=True)
                pipe.get(keys.LEGACY_MARKS_UNTIL)
                self._until = float(pipe.execute()[1])
            except Exception:  # noqa: BLE001 - the request's own step meets the same error
                self._until = float("inf")
        return now < self._until

    @classmethod
    def extend(cls, redis: Any, now: float | None = None) -> None:
        """Earlier-shape marks were just written (`migrate --from-redis`): look for them LEGACY_HOURS more."""
        until = int(time.time() if now is None else now) + cls.LEGACY_HOURS * 3600
        redis.eval("if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then "
                   "redis.call('SET', KEYS[1], ARGV[1]) end", 1, keys.LEGACY_MARKS_UNTIL, until)


# This process's view (the webhook's processes each keep their own).
LEGACY_MARKS = LegacyMarks()


def accept_inbound(redis: Any, message: dict[str, Any], idempotency_token: str | None = None,
                   account_sid: str | None = None, remember_texted: bool = False, opt_out_key: str | None = None) -> bool:
    """Queue an inbound message on its conversation; False if it was seen in the 48 hours before its
    `received_at` (also the clock the marks are kept by; a mark may be recognised up to 6 hours
    longer, see ACCEPT_LUA). Its conversation's mark also says when the person last texted
    (last_wrote).

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
    legacy = LEGACY_MARKS.present(redis)
    # Handed to redis-py as bytes: its encoder takes bytes as they are, where each str costs a chain
    # of isinstance checks and an encode (a fifth of the webhook's Redis call, bench/webhook_cost.py).
    accepted = bool(script(redis, ACCEPT_LUA)(
        keys=_encoded([seen_sid, seen_token, keys.inbox(conversation), keys.PENDING, keys.opted_out(opt_out_key or message["to"]),
              keys.WAKE_UPS, keys.texted(conversation), keys.conversation_lock(conversation)]),
        # The wake-up is named after the message that caused it, which is unique once accepted.
        args=_encoded([jsonio.dumps(message), conversation, repr(message["received_at"]), message["event"], message["sender"],
              f"wake-{message['sid']}", message["to"] if remember_texted else "",
              keys.seen_field(account, message["sid"]) if legacy else b"",
              keys.seen_field(account, idempotency_token or message["sid"]) if legacy else b"",
              int(message["received_at"] // 3600), keys.mark_field(conversation), keys.mark_digest(account, message["sid"]),
              keys.mark_digest(account, idempotency_token or message["sid"]), b"1" if legacy else b""]),
    ))
    # Counted in this process's tally, written to Redis with the rest of it (shared.metrics.Tally).
    metrics.TALLY.incr("sms_inbound", result="accepted" if accepted else "duplicate")
    return accepted


def _encoded(values: list[Any]) -> list[bytes]:
    """`values` as redis-py would send them (str as UTF-8, numbers by repr), already bytes."""
    return [value if isinstance(value, bytes) else (value if isinstance(value, str) else repr(value)).encode()
            for value in values]


# When each person last texted, by the marks (ACCEPT_LUA) of the 48 hours looked in and the
# previous release's keys.wrote (read until it expires); 0 when neither knows (or it was erased).
# KEYS: the mark hashes looked in, then each person's keys.wrote. ARGV: each person's keys.mark_field.
LAST_WROTE_LUA = MARK_TIME_LUA + """
if #ARGV == 0 then return {} end
local hashes = #KEYS - #ARGV
local before, latest = {}, {}
for i = 1, #ARGV do before[i] = KEYS[hashes + i] end
for i, wrote in ipairs(redis.call('MGET', unpack(before))) do latest[i] = math.floor(tonumber(wrote) or 0) end
for h = 1, hashes do
  for i, value in ipairs(redis.call('HMGET', KEYS[h], unpack(ARGV))) do
    if value then latest[i] = math.max(latest[i], time_of(value)) end
  end
end
return latest
"""


def last_wrote(redis: Any, bot_id: int, people: list[str], now: float | None = None) -> Any:
    """When each of `people` last texted the bot (Unix seconds, 0: not within the marks' 48 hours),
    as the webhook marked it the moment it accepted the text. `redis` may be a pipeline (the engine
    callback's reader batches this with the handoffs' copy), hence EVAL, as settle's."""
    conversations_ = [keys.conversation_id(bot_id, person) for person in people]
    hashes = keys.marks_looked_in(int((time.time() if now is None else now) // 3600), DEDUPE_TTL // 3600)
    return redis.eval(LAST_WROTE_LUA, len(hashes) + len(people), *hashes,
                      *[keys.wrote(conversation) for conversation in conversations_],
                      *[keys.mark_field(conversation) for conversation in conversations_])


# An erase (shared.erasure): the conversation's marks no longer say when the person texted (their time
# becomes 0); the digests stay, so a retry of a text from before is still a duplicate.
# KEYS: the mark hashes looked in. ARGV: the conversation's keys.mark_field.
FORGET_WROTE_LUA = MARK_TIME_LUA + """
for _, hash in ipairs(KEYS) do
  local value = redis.call('HGET', hash, ARGV[1])
  if value then redis.call('HSET', hash, ARGV[1], packed(0) .. string.sub(value, 5)) end
end
"""


def forget_wrote(redis: Any, conversation: str) -> None:
    """Make the marks of the conversation forget when the person texted (see FORGET_WROTE_LUA)."""
    hashes = keys.marks_looked_in(int(time.time() // 3600), DEDUPE_TTL // 3600)
    script(redis, FORGET_WROTE_LUA)(keys=hashes, args=[keys.mark_field(conversation)])


# Add replies to the outbox in order, optionally finishing the inbound message that produced
# them; returns the id to kick when the outbox was idle, so exactly one kick starts a chain of
# sends whoever else is adding or removing replies; FENCED (-1), doing nothing, when the caller's
# conversation lease is no longer its own; ERASED (-2), doing nothing, when the inbound to finish
# is no longer being processed: its conversation was erased while the engine was asked (nothing
# of it may be sent or logged after the erase). A function, so the worker's step can go on to take
# the first reply's turn (worker.conversation).
# queue(outbox, reply records, processing, pending, log outbox, conversation lease,
#       the inbound to finish (or ''), conversation, now, log record (or ''), lease token (or ''),
#       where in ARGV the (id, reply) pairs start, whether the caller writes the first reply's record,
#       whether the caller notes the conversation in the pending set)
QUEUE_FUNCTION = """
local function queue(outbox, records, processing, pending, log, lock, done, conversation, now, record, token, first,
                     caller_writes_first, caller_notes_pending)
  if token ~= '' and redis.call('GET', lock) ~= token then return -1 end
  if done ~= '' and redis.call('LREM', processing, 1, done) == 0 then return -2 end
  if record ~= '' then redis.call('RPUSH', log, record) end
  if #ARGV < first then return false end
  local queued = 0
  for i = first, #ARGV - 1, 2 do
    if i > first or not caller_writes_first then redis.call('HSET', records, ARGV[i], ARGV[i + 1]) end
    queued = redis.call('RPUSH', outbox, ARGV[i])
  end
  if not caller_notes_pending then redis.call('ZADD', pending, now, conversation) end
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
