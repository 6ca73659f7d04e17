"""The conversations' marks (issue 28): a field per conversation in a hash per 6 hours, its value when
the person last texted and the digests of their texts' MessageSids and idempotency tokens."""

from __future__ import annotations

import time

import redis as redis_lib

from shared import keys
from shared.bots import Bot
from shared.conversations import INBOUND, accept_inbound, last_wrote
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
