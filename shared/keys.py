"""Every Redis key this service uses, in one place.

Keys of one conversation share a hash tag ({bot_id:sender}), which keeps them on one shard
should this ever move to a Redis Cluster.
"""

from __future__ import annotations

import hashlib
import time

PREFIX = "sms"

# The bot registry lives in the database; a change is announced here so every process's cache drops it.
BOTS_CHANGED_CHANNEL = f"{PREFIX}:bot:changed"
# The registry's copy (a hash; see shared/bots.py, RegistryCopy): what the webhook and the workers
# need of every bot, so they accept and answer texts while the database is unreachable.
REGISTRY = f"{PREFIX}:registry"


# Inbound deduplication (MessageSid / I-Twilio-Idempotency-Token), kept 48 hours. Scoped by account,
# so a SID that one tenant's signed requests name cannot mark another tenant's message a duplicate.
# How the previous release kept a mark, read until its hashes expire (this release writes MARKS,
# below): a field of a hash per 6 hours (about 65 bytes, where a key of its own took about 200),
# its value the hour it was made: the webhook looks in the 9 hashes that can hold the last 48 hours
# (49 hourly ones cost Redis three times the webhook's whole step), and each hash expires 48 hours
# after its last hour ends.
SEEN_HOURS = f"{PREFIX}:seen:hours:"  # + the first of its hours (Unix time // 3600)
SEEN_BUCKET_HOURS = 6
SEEN_FIELD_BYTES = 12  # 96 bits of BLAKE2b: a false duplicate is beyond reach in 48 hours of any traffic


def seen_hours(hour: int) -> str:
    """The hash of the marks made in `hour` (and the other hours of its bucket)."""
    return f"{SEEN_HOURS}{hour - hour % SEEN_BUCKET_HOURS}"


def seen_field(account: str, token: str) -> bytes:
    return hashlib.blake2b(f"{account}:{token}".encode(), digest_size=SEEN_FIELD_BYTES).digest()


# Marks, kept 48 hours, of who texted the bot and when, and of what they texted: a field per
# conversation in a hash per 6 hours (the dedupe marks of every message, and the push window's "when
# the person last wrote", which were a field per message plus a key per person, cost about 180
# bytes per message; this, about 93 for a person's first text of a bucket, with or without an
# idempotency token, and 8 or 16 more, give or take the allocator's size classes, for each further
# one). The field is a digest of the conversation (MARK_FIELD_BYTES, as SEEN_FIELD_BYTES);
# its value the last text's time of arrival (4 bytes, big-endian Unix seconds; 0 once erased, see
# shared/erasure.py), a slot the size of a digest naming the older buckets of the 48 hours in which
# the conversation had a field when this one was written (MARK_SLOT, then a byte: bit 0 the bucket
# before; values the previous release wrote have no slot), then the digests (MARK_DIGEST_BYTES each)
# of the MessageSids and idempotency tokens the conversation's texts of that bucket carried. Shaped
# as a digest, the slot keeps the digests where the previous release looks for them, so during a
# rolling deploy its processes still know a retry of a text this release accepted. A retry must
# name the same conversation (bot and From) to be found: Twilio's retries repeat the request. Each
# hash expires 48 hours after its last hour ends, as SEEN_HOURS's.
MARKS = f"{PREFIX}:marks:"  # + the first of its hours (Unix time // 3600)
MARK_FIELD_BYTES = SEEN_FIELD_BYTES
# 64 bits: a text is taken for a duplicate only if its digest equals one of its OWN conversation's
# marks of the last 54 hours, not any of all traffic: a person's thousandth text there, 1 in 10^16;
# 10^8 texts in 48 hours, a hundred per person, one false duplicate in some 4 x 10^9 such spans. Ample.
MARK_DIGEST_BYTES = 8
# The slot's first 7 bytes, then the byte of older buckets. A digest beginning so is a 1 in 2^56 chance.
MARK_SLOT = "#older#"


def marks(hour: int) -> str:
    """The hash of the conversations' marks made in `hour` (and the other hours of its bucket)."""
    return f"{MARKS}{hour - hour % SEEN_BUCKET_HOURS}"


def marks_looked_in(hour: int, hours: int = 48) -> list[str]:
    """The hashes that can hold the marks of the `hours` before `hour`, newest first."""
    oldest = hour - hours
    return [marks(first) for first in range(hour - hour % SEEN_BUCKET_HOURS, oldest - oldest % SEEN_BUCKET_HOURS - 1,
                                            -SEEN_BUCKET_HOURS)]


def mark_field(conversation: str) -> bytes:
    return hashlib.blake2b(conversation.encode(), digest_size=MARK_FIELD_BYTES).digest()


def mark_digest(account: str, token: str) -> bytes:
    return hashlib.blake2b(f"{account}:{token}".encode(), digest_size=MARK_DIGEST_BYTES).digest()


# Until when (Unix seconds) marks of the earlier shapes (seen keys, SEEN_HOURS) may still be in Redis
# and must be read (shared.conversations.LegacyMarks): set the first time this release's webhook
# finds it missing, and pushed on by `migrate --from-redis`, which writes seen keys.
LEGACY_MARKS_UNTIL = f"{PREFIX}:legacy-marks-until"


# A mark as a key of its own: how releases before issue 28 wrote them (and `migrate --from-redis`
# still carries the oldest release's marks), read until they expire; status callbacks' resend marks.
def seen(account: str, token: str) -> str:
    return f"{PREFIX}:seen:{account}:{token}"


# Opt-out: the Redis copy of who opted out of one bot number (a hash; see shared/optout.py). Earlier
# releases kept a set at sms:optout:<number>; the new name keeps the two from ever meeting.
def opted_out(bot_number: str) -> str:
    return f"{PREFIX}:opted-out:{bot_number}"


# Conversations: one per (bot, sender).
def conversation_id(bot_id: int, sender: str) -> str:
    return f"{bot_id}:{sender}"


def split_conversation_id(conversation: str) -> tuple[int, str]:
    bot_id, sender = conversation.split(":", 1)
    return int(bot_id), sender


def _conv(conversation: str, part: str) -> str:
    return f"{PREFIX}:conv:{{{conversation}}}:{part}"


def inbox(conversation: str) -> str:
    """Inbound messages waiting for the engine, oldest first."""
    return _conv(conversation, "inbox")


def processing(conversation: str) -> str:
    """The inbound message the engine is working on: survives a worker crash."""
    return _conv(conversation, "processing")


def conversation_lock(conversation: str) -> str:
    return _conv(conversation, "lock")


def outbox(conversation: str) -> str:
    """Ids of replies waiting to be sent, in order."""
    return _conv(conversation, "outbox")


def outbox_lock(conversation: str) -> str:
    return _conv(conversation, "outbox-lock")


def replies(conversation: str) -> str:
    """Reply records by reply id (hash), outbox entries and the failed ones kept for replay."""
    return _conv(conversation, "replies")


def texted(conversation: str) -> str:
    """The bot's number the person last texted (bots with several numbers or a messaging service),
    kept as long as dedupe marks: replies that answer no inbound of their own go from it."""
    return _conv(conversation, "texted")


def wrote(conversation: str) -> str:
    """When the person last texted the bot, as the previous release kept it (48 hours): read by the
    push window until it expires; the time is in the conversation's MARKS field now."""
    return _conv(conversation, "wrote")


# Conversations with work outstanding, scored by when they should next make progress;
# the worker's sweeper kicks any that fall behind (e.g. after a worker was killed).
PENDING = f"{PREFIX}:pending"
SWEEPER_LOCK = f"{PREFIX}:sweeper-lock"
# The conversations queue: wake-ups (encoded Dramatiq messages) waiting for a worker, oldest first
# (shared/wakeups.py).
WAKE_UPS = f"{PREFIX}:wake-ups"
# Message-log records on their way to the database, oldest first, and the lease of the one worker
# process that writes them there (worker/logdrain.py); records it could not write are kept aside.
LOG_OUTBOX = f"{PREFIX}:log:outbox"
LOG_DRAIN_LOCK = f"{PREFIX}:log:drain-lock"
LOG_REFUSED = f"{PREFIX}:log:refused"

# The numbers each bot's Messaging Service has sent from (a hash, number -> bot id; shared/poolnumbers.py).
POOL_NUMBERS = f"{PREFIX}:pool-numbers"
# Pool numbers an operator took from a bot lately (number -> bot id): a status callback of an earlier
# send from one must not make it the bot's again (shared.poolnumbers).
POOL_NUMBERS_RELEASED = f"{PREFIX}:pool-numbers:released"
# Held by the one worker process purging old log rows (worker/retention.py).
RETENTION_LOCK = f"{PREFIX}:retention-lock"
# How many scheduled or held messages wait, by reason, as the workers last counted them in the
# database (worker/scheduler.py), for /metrics.
SCHEDULED_WAITING = f"{PREFIX}:scheduled:waiting"


def scheduled_queued(scheduled_id: str) -> str:
    """Set in the step that queues a scheduled message: a worker that dies before its database
    commit leaves the message waiting there, and the next pass must not queue it twice."""
    return f"{PREFIX}:scheduled:queued:{scheduled_id}"


# Earlier releases kept a reply that failed for good here for 7 days; the database's dead_letters
# table holds them now (`mammut-sms migrate --from-redis` copies what is left).
def dead_reply(reply_id: str) -> str:
    return f"{PREFIX}:dead-reply:{reply_id}"


# Pacing state of one sender number.
def pace(sender_number: str) -> str:
    return f"{PREFIX}:pace:{sender_number}"


# What /readyz writes to learn that Redis takes writes (not only that it answers).
READY_PROBE = f"{PREFIX}:ready-probe"

# Metrics recorded by every process, rendered by the web process at /metrics.
METRIC_COUNTERS = f"{PREFIX}:metrics:counters"
METRIC_HISTOGRAMS = f"{PREFIX}:metrics:histograms"


def engine_latency(bot_id: int) -> str:
    """A list of the bot's latest engine answer times ("<unix time> <seconds>", newest first), capped."""
    return f"{PREFIX}:metrics:engine-latency:{bot_id}"


def daily_sends(day: str) -> str:
    """A hash of bot id -> replies sent on `day` (UTC, YYYYMMDD), for max-messages-per-day, and of
    `<bot id>:segments` -> their segments, for max-segments-per-day."""
    return f"{PREFIX}:sent:{day}"


def daily_pushes(day: str) -> str:
    """A hash of bot id -> replies its engine's callback queued on `day` (UTC, YYYYMMDD)."""
    return f"{PREFIX}:pushed:{day}"


def replies_this_minute(conversation: str, at: float | None = None) -> str:
    """A count of the replies queued to the person in the current minute (max-replies-per-minute)."""
    minute = int((time.time() if at is None else at) // 60)
    return f"{_conv(conversation, 'replies-minute')}:{minute}"


def erased(conversation: str) -> str:
    """When the person's data with the bot was erased on request: records of messages from before
    then, still on their way to the database (the log outbox), are dropped rather than written."""
    return f"{PREFIX}:erased:{conversation}"


def operator_send(bot_id: int, idempotency_key: str) -> str:
    """The answer to an operator's send under an Idempotency-Key, kept for a day."""
    return f"{PREFIX}:operator-send:{bot_id}:{idempotency_key}"


def handoffs(bot_id: int) -> str:
    """The Redis copy of which of a bot's conversations a human has taken over (shared.handoff): a
    hash of person -> until (Unix seconds; 0: until resumed), with LOADED once it holds the database's."""
    return f"{PREFIX}:handoffs:{bot_id}"


# The operator console (webhook/console): sessions, sign-in attempts, and news for open pages.
def console_session(token_hash: str) -> str:
    """A signed-in browser's session (a hash: operator, csrf), under the SHA-256 of its cookie."""
    return f"{PREFIX}:console:session:{token_hash}"


def console_sessions_of(operator_id: int) -> str:
    """The set of an operator's sessions, so signing out (or a new password) ends them everywhere."""
    return f"{PREFIX}:console:sessions:{operator_id}"


def console_sign_in_failures(kind: str, value: str) -> str:
    """Failed sign-ins in the current window per account (`kind` "account") or per address ("address")."""
    return f"{PREFIX}:console:sign-in-failures:{kind}:{value}"


def console_seen(operator_id: int) -> str:
    """A hash of conversation -> when the operator last opened it (the inbox marks what changed since)."""
    return f"{PREFIX}:console:seen:{operator_id}"


# Published when a conversation changes (a message logged, a delivery status, a handoff): `bot_id person`.
CONSOLE_NEWS_CHANNEL = f"{PREFIX}:console:news"
