"""The bot store against real Redis: the index by number, atomic moves, encryption, the web cache."""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_lib
from cryptography.fernet import Fernet

from shared import keys
from shared.bots import BotCache, BotStore, NumberTaken
from shared.crypto import Vault
from tests.conftest import BOT_ACCOUNT_SID, CREDENTIALS_KEY


def fields(number: str, **extra: object) -> dict[str, object]:
    return {"name": "bot", "twilio-account-sid": BOT_ACCOUNT_SID, "twilio-auth-token": "token-123456",
            "main-phone-number": number, **extra}


def test_a_bot_is_found_by_its_number_in_one_round_trip(store: BotStore, redis: redis_lib.Redis,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """by_number resolves through one Redis command; the record comes back decrypted."""
    created = store.create(fields("+15550001111"))
    store.by_number("+15550001111")  # the script is loaded once; later calls go by SHA
    commands: list[str] = []
    execute = redis.execute_command
    monkeypatch.setattr(redis, "execute_command", lambda *args, **kw: commands.append(args[0]) or execute(*args, **kw))

    found = store.by_number("+15550001111")

    assert (created.id, "token-123456") == (found.id, found.auth_token)
    assert ["EVALSHA"] == commands


def test_concurrent_registrations_of_one_number_yield_one_bot(store: BotStore) -> None:
    """Ten threads race to register the same number: exactly one wins, nine get NumberTaken."""
    outcomes: list[str] = []

    def register() -> None:
        try:
            store.create(fields("+15550002222"))
            outcomes.append("created")
        except NumberTaken:
            outcomes.append("taken")

    threads = [threading.Thread(target=register) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert (1, 9) == (outcomes.count("created"), outcomes.count("taken"))


def test_rotated_keys_still_decrypt_old_tokens(redis: redis_lib.Redis) -> None:
    """With a new key first and the old one second, tokens written under the old key still read."""
    old_store = BotStore(redis, Vault([CREDENTIALS_KEY]))
    bot = old_store.create(fields("+15550003333"))

    rotated = BotStore(redis, Vault([Fernet.generate_key().decode(), CREDENTIALS_KEY]))

    assert "token-123456" == rotated.get(bot.id).auth_token


def test_a_wrong_key_fails_loudly(redis: redis_lib.Redis, store: BotStore) -> None:
    """Reading with a key that never encrypted the token is an error that names CREDENTIALS_KEY."""
    bot = store.create(fields("+15550004444"))

    with pytest.raises(ValueError, match="CREDENTIALS_KEY"):
        BotStore(redis, Vault([Fernet.generate_key().decode()])).get(bot.id)


def test_the_web_cache_forgets_a_number_when_the_registry_changes_it(store: BotStore, redis: redis_lib.Redis) -> None:
    """An update made by another process reaches the cache through Redis pub/sub, well before its TTL."""
    cache = BotCache(store, redis, ttl=300)
    bot = store.create(fields("+15550005555"))
    assert bot.id == cache.by_number("+15550005555").id  # starts the listener
    deadline = time.monotonic() + 5
    while redis.pubsub_numsub(keys.BOTS_CHANGED_CHANNEL)[0][1] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bot.id == cache.by_number("+15550005555").id  # now cached

    other_process_store = BotStore(redis, Vault([CREDENTIALS_KEY]))
    other_process_store.update(bot.id, {"main-phone-number": "+15550006666"})

    deadline = time.monotonic() + 5
    while cache.by_number("+15550005555") is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.by_number("+15550005555") is None
    assert bot.id == cache.by_number("+15550006666").id
