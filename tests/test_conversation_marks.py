"""The conversations' marks (issue 28): a field per conversation in a hash per 6 hours, its value when
the person last texted and the digests of their texts' MessageSids and idempotency tokens."""

from __future__ import annotations

import time

import pytest
import redis as redis_lib

from shared import keys
from shared.bots import Bot
from shared.conversations import INBOUND, MARK_CLOCK_SLACK_SECONDS, LegacyMarks, accept_inbound, last_wrote
from tests.test_inbound import SENDER, inbox, raw_client


def text(bot: Bot, sid: str, received_at: float) -> dict[str, object]:
    return INBOUND.load({"sid": sid, "bot_id": bot.id, "sender": SENDER, "to": bot.number, "body": sid,
                        "received_at": received_at})


def test_a_digest_is_found_only_at_a_digests_place(redis: redis_lib.Redis, redis_url: str, bot: Bot) -> None:
    """The bytes of a text's digest, showing up astride two other digests of the conversation's mark,
    do not make it a duplicate."""
    # Given a mark whose two digests hold, between them, the digest of a MessageSid not yet seen
    now = time.time()
    wanted = keys.mark_digest(bot.account_sid, "SMastride")
    half = keys.MARK_DIGEST_BYTES // 2
    value = int(now).to_bytes(4, "big") + b"\x01" * half + wanted[:half] + wanted[half:] + b"\x02" * half
    raw_client(redis_url).hset(keys.marks(int(now // 3600)), keys.mark_field(keys.conversation_id(bot.id, SENDER)),
                               value)
    # When a text with that MessageSid arrives
    accepted = accept_inbound(redis, text(bot, "SMastride", now), account_sid=bot.account_sid)
    # Then it is queued
    assert (True, ["SMastride"]) == (accepted, [m["sid"] for m in inbox(redis)])


def test_the_time_kept_is_the_latest_texts(redis: redis_lib.Redis, bot: Bot) -> None:
    """A text stamped earlier than one accepted before it (webhooks' clocks differ a little) leaves the later time."""
    now = time.time()
    assert accept_inbound(redis, text(bot, "SMlater", now), account_sid=bot.account_sid)
    assert accept_inbound(redis, text(bot, "SMearlier", now - 30), account_sid=bot.account_sid)
    assert [int(now)] == last_wrote(redis, bot.id, [SENDER], now)


def test_a_text_47_hours_old_is_known_for_the_push_window(redis: redis_lib.Redis, bot: Bot) -> None:
    """The reader looks in every bucket of the 48 hours, not only the current one."""
    now = time.time()
    assert accept_inbound(redis, text(bot, "SM47ago", now - 47 * 3600), account_sid=bot.account_sid)
    assert [int(now - 47 * 3600)] == last_wrote(redis, bot.id, [SENDER], now)


def test_a_wrote_key_of_the_previous_release_and_a_mark_give_the_later_time(redis: redis_lib.Redis, bot: Bot) -> None:
    """Both are read while the previous release's key lives; the later of the two wins, whichever it is."""
    now = time.time()
    conversation = keys.conversation_id(bot.id, SENDER)
    redis.set(keys.wrote(conversation), repr(now - 600), ex=3600)
    assert accept_inbound(redis, text(bot, "SMnewer", now - 3600), account_sid=bot.account_sid)
    other = "+15551230009"
    redis.set(keys.wrote(keys.conversation_id(bot.id, other)), repr(now - 7200), ex=3600)
    assert accept_inbound(redis, {**text(bot, "SMother", now - 60), "sender": other}, account_sid=bot.account_sid)
    assert [int(now - 600), int(now - 60)] == last_wrote(redis, bot.id, [SENDER, other], now)


# The byte of older buckets (keys.MARK_SLOT): a later text of a bucket looks only where the
# conversation has marks. `hour` is the first of a bucket, so the arithmetic below stays in buckets.
def _bucket_start(now: float) -> float:
    hour = int(now // 3600)
    return (hour - hour % keys.SEEN_BUCKET_HOURS) * 3600 + 60


def test_a_retry_from_an_older_bucket_is_found_after_the_person_texted_again(redis: redis_lib.Redis, bot: Bot) -> None:
    """The first text of a bucket notes the older buckets holding the conversation's marks; later texts
    of the bucket still find a retry of a text 40 hours old, by MessageSid and by idempotency token."""
    now = _bucket_start(time.time())
    assert accept_inbound(redis, text(bot, "SM40ago", now - 40 * 3600), "token-40ago", account_sid=bot.account_sid)
    assert accept_inbound(redis, text(bot, "SMnow-1", now), account_sid=bot.account_sid)
    assert accept_inbound(redis, text(bot, "SMnow-2", now + 1), account_sid=bot.account_sid)
    by_sid = accept_inbound(redis, text(bot, "SM40ago", now + 2), account_sid=bot.account_sid)
    by_token = accept_inbound(redis, text(bot, "SMother", now + 3), "token-40ago", account_sid=bot.account_sid)
    assert ([False, False], ["SM40ago", "SMnow-1", "SMnow-2"]) == ([by_sid, by_token], [m["sid"] for m in inbox(redis)])


def test_a_later_text_of_a_bucket_looks_only_where_the_conversation_has_marks(
        redis: redis_lib.Redis, redis_url: str, bot: Bot) -> None:
    """A hash two buckets back that the conversation had no field in when its bucket's first text came is
    not read again: a key there that cannot be read as a hash does not trouble a second text, and does a
    first text's (which looks in all nine)."""
    now = _bucket_start(time.time())
    assert accept_inbound(redis, text(bot, "SMfirst", now), account_sid=bot.account_sid)
    trap = keys.marks(int(now // 3600) - 2 * keys.SEEN_BUCKET_HOURS)
    redis.set(trap, "not a hash")
    assert accept_inbound(redis, text(bot, "SMsecond", now + 1), account_sid=bot.account_sid)
    with pytest.raises(redis_lib.ResponseError, match="WRONGTYPE"):
        accept_inbound(redis, {**text(bot, "SMstranger", now + 2), "sender": "+15551239999"}, account_sid=bot.account_sid)


def test_only_the_older_buckets_the_byte_names_are_looked_in(redis: redis_lib.Redis, bot: Bot) -> None:
    """With a mark 30 hours back (five buckets), a later text of the bucket looks there and in the
    previous bucket, not in the buckets between: a key two buckets back that cannot be read as a hash
    does not trouble it, and a retry of the text 30 hours old is still found."""
    now = _bucket_start(time.time())
    assert accept_inbound(redis, text(bot, "SM30back", now - 30 * 3600), account_sid=bot.account_sid)
    assert accept_inbound(redis, text(bot, "SMbucket-first", now), account_sid=bot.account_sid)
    redis.set(keys.marks(int(now // 3600) - 2 * keys.SEEN_BUCKET_HOURS), "not a hash")
    assert accept_inbound(redis, text(bot, "SMbucket-second", now + 1), account_sid=bot.account_sid)
    assert not accept_inbound(redis, text(bot, "SM30back", now + 2), account_sid=bot.account_sid)


def test_a_later_text_of_a_bucket_adds_its_digest_and_nothing_else(
        redis: redis_lib.Redis, redis_url: str, bot: Bot) -> None:
    """Three texts of a bucket leave one slot and three digests: the slot is rewritten, not copied."""
    now = _bucket_start(time.time())
    for n in range(3):
        assert accept_inbound(redis, text(bot, f"SMgrow-{n}", now + n), account_sid=bot.account_sid)
    value = raw_client(redis_url).hget(keys.marks(int(now // 3600)), keys.mark_field(keys.conversation_id(bot.id, SENDER)))
    assert keys.MARK_SLOT.encode() + b"\x00" + b"".join(
        keys.mark_digest(bot.account_sid, f"SMgrow-{n}") for n in range(3)) == value[4:]


def test_a_text_a_lagging_clock_marks_in_the_previous_bucket_is_still_found(redis: redis_lib.Redis, bot: Bot) -> None:
    """A webhook whose clock is behind may mark the previous bucket after this bucket's first text noted
    it empty: the previous bucket is always looked in."""
    now = _bucket_start(time.time())
    assert accept_inbound(redis, text(bot, "SMahead", now), account_sid=bot.account_sid)
    assert accept_inbound(redis, text(bot, "SMbehind", now - 120), account_sid=bot.account_sid)  # the bucket before
    assert not accept_inbound(redis, text(bot, "SMbehind", now + 1), account_sid=bot.account_sid)


def test_an_hour_into_its_bucket_a_field_is_not_looked_past_to_the_previous_bucket(
        redis: redis_lib.Redis, bot: Bot) -> None:
    """Once the conversation's field was written an hour into its bucket, no webhook's clock can still
    put a text in the bucket before: a later text does not look there (a key there that cannot be read
    as a hash does not trouble it), where a text of a field written in the bucket's first hour does."""
    start = _bucket_start(time.time()) - 60
    previous = keys.marks(int(start // 3600) - keys.SEEN_BUCKET_HOURS)
    assert accept_inbound(redis, text(bot, "SMearly", start + 60), account_sid=bot.account_sid)
    redis.set(previous, "not a hash")
    with pytest.raises(redis_lib.ResponseError, match="WRONGTYPE"):
        accept_inbound(redis, text(bot, "SMearly-2", start + 120), account_sid=bot.account_sid)
    redis.delete(previous)
    assert accept_inbound(redis, text(bot, "SMan-hour-in", start + MARK_CLOCK_SLACK_SECONDS), account_sid=bot.account_sid)
    redis.set(previous, "not a hash")
    assert accept_inbound(redis, text(bot, "SMlater", start + MARK_CLOCK_SLACK_SECONDS + 1), account_sid=bot.account_sid)


def test_a_lagging_clocks_mark_is_still_found_hours_later(redis: redis_lib.Redis, bot: Bot) -> None:
    """A text a lagging webhook put in the previous bucket, after the bucket's first text: the field's
    next write, an hour in, finds it there and names it, so a retry of it hours later is still known."""
    start = _bucket_start(time.time()) - 60
    assert accept_inbound(redis, text(bot, "SMahead", start + 60), account_sid=bot.account_sid)
    assert accept_inbound(redis, text(bot, "SMbehind", start - 120), account_sid=bot.account_sid)  # the bucket before
    assert accept_inbound(redis, text(bot, "SMan-hour-in", start + MARK_CLOCK_SLACK_SECONDS + 60),
                          account_sid=bot.account_sid)
    assert not accept_inbound(redis, text(bot, "SMbehind", start + 5 * 3600), account_sid=bot.account_sid)
    assert ["SMahead", "SMbehind", "SMan-hour-in"] == [m["sid"] for m in inbox(redis)]


def test_an_erased_field_still_looks_in_the_previous_bucket(redis: redis_lib.Redis, redis_url: str, bot: Bot) -> None:
    """An erase sets the field's time to 0, which says nothing of when it was written: the previous
    bucket is looked in again, and a retry of a text marked there is still known."""
    start = _bucket_start(time.time()) - 60
    assert accept_inbound(redis, text(bot, "SMbefore", start - 120), account_sid=bot.account_sid)
    assert accept_inbound(redis, text(bot, "SMan-hour-in", start + MARK_CLOCK_SLACK_SECONDS + 60),
                          account_sid=bot.account_sid)
    field = keys.mark_field(keys.conversation_id(bot.id, SENDER))
    current = keys.marks(int(start // 3600))
    raw = raw_client(redis_url)
    value = raw.hget(current, field)
    # Rewritten as if its previous bucket were not named (a lagging mark after the field's last write), and erased.
    raw.hset(current, field, b"\0\0\0\0" + value[4:4 + len(keys.MARK_SLOT)] + b"\0" + value[5 + len(keys.MARK_SLOT):])
    assert not accept_inbound(redis, text(bot, "SMbefore", start + 4 * 3600), account_sid=bot.account_sid)


def test_a_field_the_previous_release_wrote_makes_the_next_text_look_everywhere(
        redis: redis_lib.Redis, redis_url: str, bot: Bot) -> None:
    """A current field without the byte of older buckets (issue 28's first layout) says nothing of them:
    the next text looks in all nine, finds a retry 30 hours old, and writes the byte it learnt."""
    now = _bucket_start(time.time())
    raw = raw_client(redis_url)
    field = keys.mark_field(keys.conversation_id(bot.id, SENDER))
    hour = int(now // 3600)
    old = int(now - 30 * 3600)
    raw.hset(keys.marks(hour - 30), field, old.to_bytes(4, "big") + keys.mark_digest(bot.account_sid, "SM30ago"))
    raw.hset(keys.marks(hour), field, int(now).to_bytes(4, "big") + keys.mark_digest(bot.account_sid, "SMearlier"))
    assert not accept_inbound(redis, text(bot, "SM30ago", now + 1), account_sid=bot.account_sid)
    assert not accept_inbound(redis, text(bot, "SMearlier", now + 1), account_sid=bot.account_sid)
    assert accept_inbound(redis, text(bot, "SMnew", now + 2), account_sid=bot.account_sid)
    value = raw.hget(keys.marks(hour), field)
    # bit 4: the bucket five back (30 hours before the first hour of this one)
    assert (keys.MARK_SLOT.encode() + bytes([1 << 4]),
            [keys.mark_digest(bot.account_sid, sid) for sid in ("SMearlier", "SMnew")]) == (
        value[4:12], [value[12:20], value[20:28]])
    assert not accept_inbound(redis, text(bot, "SM30ago", now + 3), account_sid=bot.account_sid)


# The previous release's look for a digest in a field (its ACCEPT_LUA's holds(), as released before
# the slot): at 8-byte steps after the 4 bytes of time.
_PREVIOUS_RELEASES_HOLDS = """
local value, digest = redis.call('HGET', KEYS[1], ARGV[1]), ARGV[2]
if not value then return 0 end
local at = string.find(value, digest, 5, true)
while at and (at - 5) % 8 ~= 0 do at = string.find(value, digest, at + 1, true) end
return at and 1 or 0
"""


def test_the_previous_release_finds_every_digest_in_a_field_with_the_slot(
        redis: redis_lib.Redis, redis_url: str, bot: Bot) -> None:
    """During a rolling deploy the previous release's processes still answer texts: its look finds the
    digests of texts this release accepted (by MessageSid and by idempotency token), and no other."""
    now = _bucket_start(time.time())
    assert accept_inbound(redis, text(bot, "SMdeploy-1", now), "token-deploy-1", account_sid=bot.account_sid)
    assert accept_inbound(redis, text(bot, "SMdeploy-2", now + 1), account_sid=bot.account_sid)
    field = keys.mark_field(keys.conversation_id(bot.id, SENDER))
    hash_ = keys.marks(int(now // 3600))
    found = [redis.eval(_PREVIOUS_RELEASES_HOLDS, 1, hash_, field, keys.mark_digest(bot.account_sid, name))
             for name in ("SMdeploy-1", "token-deploy-1", "SMdeploy-2", "SMnever-sent")]
    assert [1, 1, 1, 0] == found


# At the first hour of a bucket, whatever the hour the suite runs at: a mark's age and its hash's
# expiry differ there from what a check by the hour of arrival would give (at the last hour of a
# bucket the two agree).
def test_a_mark_49_hours_old_in_a_bucket_still_looked_in_is_not_a_duplicate(redis: redis_lib.Redis, bot: Bot) -> None:
    """49 hours after a text at a bucket's first hour, its bucket is still among the nine looked in: the
    mark is found there and judged too old."""
    now = _bucket_start(time.time())
    assert accept_inbound(redis, text(bot, "SM49", now), account_sid=bot.account_sid)
    assert accept_inbound(redis, text(bot, "SM49", now + 49 * 3600), account_sid=bot.account_sid)


def test_a_bucket_hash_expires_48_hours_after_its_last_hour(redis: redis_lib.Redis, bot: Bot) -> None:
    """A text at a bucket's first hour keeps the hash until 48 hours after the bucket's last hour ends."""
    now = _bucket_start(time.time())
    assert accept_inbound(redis, text(bot, "SMexpiry", now), account_sid=bot.account_sid)
    first = int(now // 3600)
    assert (first + keys.SEEN_BUCKET_HOURS + 48) * 3600 == redis.expiretime(keys.marks(first))


# --- The earlier shapes' marks (keys.seen, keys.SEEN_HOURS), looked for only while some may be left. ---


def plant_earlier_marks(redis: redis_lib.Redis, bot: Bot, sid: str, hour: int) -> None:
    """The marks two earlier releases would have left for a text `sid` accepted at `hour`."""
    redis.set(keys.seen(bot.account_sid, sid), "1", ex=3600)
    redis.hset(keys.seen_hours(hour), keys.seen_field(bot.account_sid, sid), str(hour))
    redis.expire(keys.seen_hours(hour), 3600)


def test_a_fresh_redis_looks_for_the_earlier_marks_for_60_hours(redis: redis_lib.Redis, bot: Bot) -> None:
    """An upgrade (or a Redis that lost the deadline): the first text sets it 60 hours ahead, and the
    earlier releases' marks stop a retry meanwhile."""
    now = time.time()
    plant_earlier_marks(redis, bot, "SMupgraded", int(now // 3600) - 2)
    assert not accept_inbound(redis, text(bot, "SMupgraded", now), account_sid=bot.account_sid)
    until = int(redis.get(keys.LEGACY_MARKS_UNTIL))
    assert int(now) + 60 * 3600 <= until <= int(time.time()) + 60 * 3600


def test_past_the_deadline_the_earlier_marks_are_not_looked_for(redis: redis_lib.Redis, bot: Bot) -> None:
    """Once none can be left, the webhook's step spends nothing on them: a mark of an earlier shape
    planted anyway is not read."""
    now = time.time()
    redis.set(keys.LEGACY_MARKS_UNTIL, int(now) - 1)
    plant_earlier_marks(redis, bot, "SMlong-ago", int(now // 3600) - 2)
    assert accept_inbound(redis, text(bot, "SMlong-ago", now), account_sid=bot.account_sid)
    # Issue 28's own marks are read as ever
    assert not accept_inbound(redis, text(bot, "SMlong-ago", now + 1), account_sid=bot.account_sid)


def test_each_process_reads_the_deadline_again_every_minute(redis: redis_lib.Redis) -> None:
    """A process learns that the deadline passed (or was pushed on, or lost) within a minute, and not on every text."""
    gate, now = LegacyMarks(), time.time()
    redis.set(keys.LEGACY_MARKS_UNTIL, int(now) + 30)
    assert gate.present(redis, now)
    redis.set(keys.LEGACY_MARKS_UNTIL, int(now) - 1)
    assert gate.present(redis, now + 20)  # read at `now`: still 10 s to go
    assert not gate.present(redis, now + 31)  # its own deadline passed, before the minute is up
    redis.set(keys.LEGACY_MARKS_UNTIL, int(now) + 3600)  # migrate --from-redis wrote seen keys
    assert not gate.present(redis, now + 59)
    assert gate.present(redis, now + 61)
    redis.delete(keys.LEGACY_MARKS_UNTIL)  # lost with the rest of Redis: set again, 60 hours ahead
    assert gate.present(redis, now + 3600 + 122)
    assert int(now) + 3600 + 122 + 60 * 3600 == int(redis.get(keys.LEGACY_MARKS_UNTIL))


def test_a_redis_that_cannot_say_reads_as_look_for_them(redis: redis_lib.Redis) -> None:
    """Unable to read the deadline, a process looks for the earlier marks: a lookup too many, never a
    retry answered twice; and it asks again a minute later, not on every text."""
    gate, now = LegacyMarks(), time.time()
    assert gate.present(redis_lib.Redis(port=1, socket_connect_timeout=0.2), now)
    redis.set(keys.LEGACY_MARKS_UNTIL, int(now) - 1)
    assert gate.present(redis, now + 59)
    assert not gate.present(redis, now + 60)


def test_extend_never_shortens_the_deadline(redis: redis_lib.Redis) -> None:
    now = time.time()
    LegacyMarks.extend(redis, now)
    assert int(now) + 60 * 3600 == int(redis.get(keys.LEGACY_MARKS_UNTIL))
    LegacyMarks.extend(redis, now - 3600)
    assert int(now) + 60 * 3600 == int(redis.get(keys.LEGACY_MARKS_UNTIL))
