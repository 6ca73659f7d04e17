"""The bot store against the real database, and the in-process cache against real Redis pub/sub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from cryptography.fernet import Fernet
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine, event, select

from shared import db, handoff, keys, optout
from shared.bots import Bot, BotCache, BotNotFound, BotStore, NumberTaken, id_route, number_route
from shared.crypto import Vault
from shared.schema import bots
from shared.settings import Settings
from tests.conftest import BOT_ACCOUNT_SID, CREDENTIALS_KEY

REPO = Path(__file__).resolve().parent.parent
# Pub/sub channels span a Redis server's databases: another test run on the same server announces
# its changes on ours, and each empties the cache once more. Query counts allow for one.
FOREIGN_SLACK = 1


def fields(number: str, **extra: object) -> dict[str, object]:
    return {"name": "bot", "twilio-account-sid": BOT_ACCOUNT_SID, "twilio-auth-token": "token-123456",
            "main-phone-number": number, **extra}


@pytest.fixture
def sql(settings: Settings) -> Engine:
    """The test database's engine, as the store and the app use it."""
    return db.get_engine(settings)


@contextmanager
def counted_queries(engine: Engine) -> Iterator[list[str]]:
    """The SQL queries `engine` runs inside the block (not SQLite's BEGIN IMMEDIATE, which opens every one)."""
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not statement.startswith("BEGIN"):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


@contextmanager
def counted_loads(store: BotStore) -> Iterator[list[str]]:
    """The routes the store looks up in the registry's copy inside the block (each a Redis round trip)."""
    routes: list[str] = []
    copied = store.copied

    def counting(route: str) -> Any:
        routes.append(route)
        return copied(route)

    store.copied = counting  # type: ignore[method-assign]
    try:
        yield routes
    finally:
        del store.copied


def _once_missing(lookup: Callable[[str], Any]) -> Callable[[str], Any]:
    """`lookup`, except that its first answer is "missing": the copy as a caller saw it before another's rebuild."""
    answers = iter([lambda route: (None, False)])

    def look(route: str) -> Any:
        return next(answers, lookup)(route)

    return look


def slowed(call: Callable[..., Any], seconds: float = 0.2) -> Callable[..., Any]:
    """`call`, taking `seconds` longer: callers started together surely meet while one call is under way."""
    def slow(*args: Any) -> Any:
        time.sleep(seconds)
        return call(*args)

    return slow


def holding(cache: BotCache, bot: Bot) -> BotCache:
    """`cache`, listening and holding `bot` (a cache keeps nothing until its listener is subscribed)."""
    cache.by_id(bot.id)
    assert eventually(lambda: cache.listening)
    cache.by_id(bot.id)
    return cache


def eventually(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_bot_is_found_by_its_number_in_one_query(store: BotStore, sql: Engine) -> None:
    """by_number reads one row; the record comes back with its token decrypted."""
    created = store.create(fields("+15550001111"))

    with counted_queries(sql) as statements:
        found = store.by_number("+15550001111")

    assert (created.id, "token-123456") == (found.id, found.auth_token)
    assert 1 == len(statements)


def test_ids_count_up_from_one_and_a_refused_number_uses_none(store: BotStore) -> None:
    """Bots get 1, 2, ... in order of registration; a registration refused for its number skips no id."""
    first = store.create(fields("+15550001001"))
    with pytest.raises(NumberTaken):
        store.create(fields("+15550001001"))
    second = store.create(fields("+15550001002"))

    assert [1, 2] == [first.id, second.id]
    assert [1, 2] == [bot.id for bot in store.all()]


def test_concurrent_registrations_of_one_number_yield_one_bot(store: BotStore) -> None:
    """Ten threads race to register the same number: exactly one wins, nine get NumberTaken."""
    outcomes: list[str] = []
    start = threading.Barrier(10)

    def register() -> None:
        start.wait()
        try:
            store.create(fields("+15550002222"))
            outcomes.append("created")
        except NumberTaken:
            outcomes.append("taken")

    threads = [threading.Thread(target=register) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert (1, 9) == (outcomes.count("created"), outcomes.count("taken"))
    assert ["+15550002222"] == [bot.number for bot in store.all()]


def test_updating_an_unknown_bot_is_bot_not_found(store: BotStore) -> None:
    """An update names a bot that must exist; nothing is created."""
    with pytest.raises(BotNotFound):
        store.update(999, {"name": "ghost"})

    assert [] == store.all()


def test_an_update_keeps_what_it_does_not_change(store: BotStore) -> None:
    """Unchanged fields, the token and the extra user fields survive an update of another field."""
    bot = store.create(fields("+15550003000", language="es", **{"engine-url": "http://engine.local/hook"}))

    updated = store.update(bot.id, {"name": "renamed", "timezone": "America/Caracas"})

    assert ("renamed", "token-123456", "http://engine.local/hook") == (
        updated.name, updated.auth_token, updated.engine_url)
    assert {"language": "es", "timezone": "America/Caracas"} == dict(store.get(bot.id).extra)


def test_the_token_is_stored_encrypted(store: BotStore, sql: Engine) -> None:
    """The row holds a Fernet token, never the plain auth token."""
    bot = store.create(fields("+15550003100"))

    with sql.connect() as connection:
        row = connection.execute(select(bots).where(bots.c.id == bot.id)).one()

    assert "token-123456" not in repr(tuple(row))
    assert "token-123456" == Vault([CREDENTIALS_KEY]).decrypt(row.auth_token_encrypted)


def test_rotated_keys_still_decrypt_old_tokens(sql: Engine, redis: redis_lib.Redis) -> None:
    """With a new key first and the old one second, tokens written under the old key still read."""
    old_store = BotStore(sql, redis, Vault([CREDENTIALS_KEY]))
    bot = old_store.create(fields("+15550003333"))

    rotated = BotStore(sql, redis, Vault([Fernet.generate_key().decode(), CREDENTIALS_KEY]))

    assert "token-123456" == rotated.get(bot.id).auth_token


def test_a_wrong_key_fails_loudly(sql: Engine, redis: redis_lib.Redis, store: BotStore) -> None:
    """Reading with a key that never encrypted the token is an error that names CREDENTIALS_KEY."""
    bot = store.create(fields("+15550004444"))

    with pytest.raises(ValueError, match="CREDENTIALS_KEY"):
        BotStore(sql, redis, Vault([Fernet.generate_key().decode()])).get(bot.id)


def test_a_change_is_committed_even_when_redis_cannot_announce_it(sql: Engine, logs: list[dict[str, object]]) -> None:
    """With Redis unreachable the registry still works; the lost announcement is logged as a warning."""
    unreachable = redis_lib.Redis(port=1, retry=Retry(NoBackoff(), 0))
    store = BotStore(sql, unreachable, Vault([CREDENTIALS_KEY]))

    bot = store.create(fields("+15550004500"))

    assert bot.id == store.by_number("+15550004500").id
    assert ["bots.change_not_announced"] == [e["event"] for e in logs if e["event"] == "bots.change_not_announced"]


class TestCache:
    """BotCache: a change anywhere reaches it at once; unknown numbers and ids cost no query per lookup."""

    @pytest.fixture
    def cache(self, store: BotStore, redis: redis_lib.Redis) -> BotCache:
        """A cache with a long TTL (so only invalidation can refresh it), already listening."""
        cache = BotCache(store, redis, ttl=300, negative_ttl=300)
        cache.by_number("+15550000000")  # starts the listener
        assert eventually(lambda: cache.listening)
        return cache

    def test_a_change_made_in_this_process_is_seen_at_once(self, store: BotStore, cache: BotCache) -> None:
        """Moving a bot's number: the old number is unknown and the new one found on the very next lookup."""
        bot = store.create(fields("+15550005555"))
        assert bot.id == cache.by_number("+15550005555").id  # now cached
        assert cache.by_number("+15550006666") is None  # and so is this miss

        store.update(bot.id, {"main-phone-number": "+15550006666"})

        assert cache.by_number("+15550005555") is None
        assert bot.id == cache.by_number("+15550006666").id

    def test_a_change_made_by_another_process_arrives_through_redis(
            self, store: BotStore, cache: BotCache, database: str, redis_url: str) -> None:
        """Another process's update reaches the cache through Redis pub/sub, well before its TTL."""
        bot = store.create(fields("+15550005555"))
        assert bot.id == cache.by_number("+15550005555").id  # now cached

        # When another process moves the bot's number
        script = ("import sys; from shared.bots import BotStore; from shared.crypto import Vault; "
                  "from shared.db import make_engine; from shared.redis import connect; "
                  "BotStore(make_engine(sys.argv[1]), connect(sys.argv[2]), Vault([sys.argv[3]]))"
                  f".update({bot.id}, {{'main-phone-number': '+15550006666'}})")
        subprocess.run([sys.executable, "-c", script, database, redis_url, CREDENTIALS_KEY], cwd=REPO, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)

        # Then this process's cache lets go of the old number, and finds the new one
        assert eventually(lambda: cache.by_number("+15550005555") is None)
        assert bot.id == cache.by_number("+15550006666").id

    def test_bots_are_cached_by_id_for_the_worker(self, store: BotStore, cache: BotCache, sql: Engine) -> None:
        """by_id reads the registry's copy once and never the database, then answers from memory until the bot changes."""
        bot = store.create(fields("+15550007000"))

        with counted_queries(sql) as statements, counted_loads(store) as loads:
            looked_up = [cache.by_id(bot.id) for _ in range(20)]
        store.update(bot.id, {"messages-per-second": 5})

        assert [bot.id] * 20 == [found.id for found in looked_up]
        assert ([], True) == (statements, len(loads) <= FOREIGN_SLACK + 1)
        assert 5.0 == cache.by_id(bot.id).messages_per_second

    def test_unknown_numbers_are_remembered_too(self, store: BotStore, cache: BotCache, sql: Engine) -> None:
        """A flood of lookups of one unregistered number costs one look at the copy and no query."""
        with counted_queries(sql) as statements, counted_loads(store) as loads:
            found = [cache.by_number("+15550008000") for _ in range(50)]

        assert {None} == set(found)
        assert ([], True) == (statements, len(loads) <= FOREIGN_SLACK + 1)

    def test_unknown_numbers_never_evict_a_bot(self, store: BotStore, redis: redis_lib.Redis) -> None:
        """Webhooks to thousands of random numbers leave the known bots cached."""
        bot = store.create(fields("+15550008200"))
        cache = BotCache(store, redis, ttl=300, negative_ttl=300, limit=10, unknown_limit=10)
        cache.by_number(bot.number)
        assert eventually(lambda: cache.listening)
        cache.by_number(bot.number)

        for n in range(500):
            assert cache.by_number(f"+1555077{n:04d}") is None

        with counted_loads(store) as loads:
            assert bot.id == cache.by_number(bot.number).id
        assert [] == loads

    def test_registering_a_number_ends_its_unknown_entry(self, store: BotStore, cache: BotCache) -> None:
        """A number looked up before it was registered is found right after."""
        assert cache.by_number("+15550008100") is None

        bot = store.create(fields("+15550008100"))

        assert bot.id == cache.by_number("+15550008100").id

    def test_the_cache_holds_a_bounded_number_of_entries(self, store: BotStore, redis: redis_lib.Redis,
                                                         sql: Engine) -> None:
        """Past its limit the oldest entries go, so unknown numbers cannot grow it without end."""
        cache = BotCache(store, redis, ttl=300, negative_ttl=300, limit=10, unknown_limit=10)
        cache.by_number("+15550000000")
        assert eventually(lambda: cache.listening)

        for n in range(100):
            cache.by_number(f"+1555009{n:04d}")

        with counted_loads(store) as newest:
            cache.by_number("+15550090099")
        with counted_loads(store) as oldest:
            cache.by_number("+15550090000")
        assert 1 == len(oldest)
        assert len(newest) <= FOREIGN_SLACK

    def test_nothing_is_kept_until_the_listener_is_subscribed(self, store: BotStore, sql: Engine) -> None:
        """Without its subscription a cache could miss a change, so it reads the registry's copy every time."""
        bot = store.create(fields("+15550009000"))
        deaf = BotCache(store, redis_lib.Redis(port=1, retry=Retry(NoBackoff(), 0)))

        with counted_loads(store) as loads:
            found = [deaf.by_number(bot.number) for _ in range(3)]

        assert ([bot.id] * 3, 3, False) == ([b.id for b in found], len(loads), deaf.listening)


class TestRegistryCopy:
    """The registry's copy in Redis: every change lands in it, a flushed one is rebuilt, a refused change leaves it be."""

    def test_each_change_is_in_the_copy_and_a_flushed_copy_is_rebuilt_from_the_database(
            self, store: BotStore, redis: redis_lib.Redis, sql: Engine) -> None:
        """Numbers moved, bots deleted: the copy routes what the database holds, before and after a flush."""
        assert store.copied(number_route("+15550010001")) is None  # the copy is built: only changes update it now
        kept = store.create(fields("+15550010001"))
        gone = store.create(fields("+15550010002"))
        store.update(kept.id, {"main-phone-number": "+15550010003", "phone-numbers": ["+15550010004"]})
        store.delete(gone.id)

        def routed() -> list[int | None]:
            found = [store.copied(number_route(n)) for n in ("+15550010001", "+15550010002", "+15550010003",
                                                              "+15550010004")]
            return [bot.id if bot else None for bot in found]

        assert [None, None, kept.id, kept.id] == routed()
        redis.delete(keys.REGISTRY)
        with counted_queries(sql) as statements:
            assert [None, None, kept.id, kept.id] == routed()
        assert 0 < len(statements)  # the rebuild's, once
        with counted_queries(sql) as statements:
            assert (None, kept.id) == (store.copied(number_route("+15550010099")), store.copied(id_route(kept.id)).id)
        assert [] == statements

    def test_a_change_the_database_cannot_take_leaves_the_copy_as_it_was(
            self, store: BotStore, redis: redis_lib.Redis, unreachable: Engine) -> None:
        """An update while the database is unreachable fails whole: the copy still routes the bot as it was."""
        bot = store.create(fields("+15550010101"))
        cut_off = BotStore(unreachable, redis, Vault([CREDENTIALS_KEY]))

        with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises
            cut_off.update(bot.id, {"main-phone-number": "+15550010102"})

        assert (bot.id, None) == (store.copied(number_route("+15550010101")).id,
                                  store.copied(number_route("+15550010102")))


# 1,000 greenlets, in a process of their own (gevent's monkey-patching is for the whole process).
GREENLETS = """
from gevent import monkey; monkey.patch_all()
import json, sys
import gevent
from sqlalchemy import event
from shared import keys
from shared.bots import BotCache, BotStore
from shared.crypto import Vault
from shared.db import make_engine
from shared.redis import connect

database, redis_url, credentials_key, bot_id = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
engine, redis = make_engine(database), connect(redis_url)
store = BotStore(engine, redis, Vault([credentials_key]))
cache = BotCache(store, redis, ttl=0.5)
cache.by_id(bot_id)
while not cache.listening:
    gevent.sleep(0.01)
cache.by_id(bot_id)
redis.delete(keys.REGISTRY)
gevent.sleep(0.6)
queries, loads, errors = [], [], []
event.listen(engine, "before_cursor_execute", lambda *args: queries.append(args[2]))
copied = store.copied

def counted(route):
    loads.append(route)
    return copied(route)

store.copied = counted

def ask():
    try:
        return cache.by_id(bot_id).id
    except Exception as error:
        errors.append(repr(error))

greenlets = [gevent.spawn(ask) for _ in range(1000)]
gevent.joinall(greenlets, timeout=60)
print(json.dumps({"found": sorted({g.value for g in greenlets if g.value is not None}), "loads": len(loads),
                  "queries": sum("FROM bots" in query for query in queries), "errors": errors[:5]}))
"""


class TestSingleFlight:
    """Hundreds of threads finding a bot's entry expired load it once, and none fails."""

    CALLERS = 300

    @staticmethod
    def all_at_once(call: Callable[[], Any], callers: int) -> tuple[list[Any], list[BaseException]]:
        barrier, results, errors = threading.Barrier(callers), [], []

        def one() -> None:
            barrier.wait()
            try:
                results.append(call())
            except BaseException as error:  # noqa: BLE001 - counted
                errors.append(error)

        threads = [threading.Thread(target=one) for _ in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return results, errors

    def test_an_expired_bot_is_loaded_once_for_hundreds_of_callers(self, store: BotStore, redis: redis_lib.Redis,
                                                                    sql: Engine) -> None:
        """300 threads ask for a bot whose entry expired: one look at the copy, no query, no error."""
        bot = store.create(fields("+15550011001"))
        cache = holding(BotCache(store, redis, ttl=0.2), bot)
        time.sleep(0.3)
        store.copied = slowed(store.copied)  # type: ignore[method-assign]

        with counted_loads(store) as loads, counted_queries(sql) as statements:
            results, errors = self.all_at_once(lambda: cache.by_id(bot.id), self.CALLERS)

        assert ([], [bot.id] * self.CALLERS, []) == (errors, [found.id for found in results], statements)
        assert len(loads) <= 1 + FOREIGN_SLACK

    def test_a_thousand_greenlets_asking_for_an_expired_bot_cost_one_query_and_no_error(
            self, store: BotStore, database: str, redis_url: str) -> None:
        """As under WORKER_POOL=gevent: 1,000 greenlets find a bot's entry expired, its copy flushed
        with it; one load, one query of the bots table (the copy's rebuild), no error."""
        bot = store.create(fields("+15550011301"))

        run = subprocess.run([sys.executable, "-c", GREENLETS, database, redis_url, CREDENTIALS_KEY, str(bot.id)],
                             cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(REPO)})

        assert 0 == run.returncode, run.stderr[-3000:]
        counted = json.loads(run.stdout.strip().splitlines()[-1])
        assert {"found": [bot.id], "loads": 1, "queries": 1, "errors": []} == counted

    def test_a_flushed_copy_is_rebuilt_once_for_hundreds_of_callers(self, store: BotStore, redis: redis_lib.Redis,
                                                                    sql: Engine) -> None:
        """300 threads ask for a bot, and for numbers nobody has, with nothing held (the copy flushed): the
        database is read for one rebuild."""
        bot = store.create(fields("+15550011101"))
        redis.delete(keys.REGISTRY)
        with counted_queries(sql) as one_rebuild:
            store.copy.rebuild(sql)
        redis.delete(keys.REGISTRY)
        cache = BotCache(store, redis)
        store.copy.rebuild = slowed(store.copy.rebuild)  # type: ignore[method-assign]

        asked = iter(range(self.CALLERS))

        def ask() -> int | None:
            # Each caller its own key: the cache's loads do not wait for each other, only the rebuild is shared.
            n = next(asked)
            found = cache.by_id(bot.id) if n == 0 else cache.by_number(f"+1555012{n:04d}")
            return found.id if found else None

        with counted_queries(sql) as statements:
            results, errors = self.all_at_once(ask, self.CALLERS)

        assert ([], [bot.id] + [None] * (self.CALLERS - 1)) == (errors, sorted(results, key=lambda r: r is None))
        assert len(one_rebuild) == len(statements)

    def test_a_caller_that_found_the_copy_missing_reads_nothing_once_another_rebuilt_it(
            self, store: BotStore, sql: Engine) -> None:
        """A caller that found the copy missing gets to the rebuild only after another caller's rebuild
        finished (a busy CPU): it finds the copy whole and reads nothing from the database."""
        bot = store.create(fields("+15550011111"))
        store.copy.rebuild(sql)
        looked = store.copy.lookup
        # As the copy was when this caller looked: missing.
        store.copy.lookup = _once_missing(looked)  # type: ignore[method-assign]

        with counted_queries(sql) as statements:
            found = store.copied(number_route("+15550011111"))

        assert (bot.id, []) == (found.id if found else None, statements)

    def test_a_copy_that_lost_its_loaded_mark_is_rebuilt_though_it_holds_other_bots(
            self, store: BotStore, redis: redis_lib.Redis, sql: Engine) -> None:
        """A copy that is not whole (a bot's write to it failed, so LOADED was dropped; or bots written
        back one by one after a flush) still has other bots' fields: a text to a bot missing from it
        rebuilds it from the database and finds the bot."""
        missing = store.create(fields("+15550011131"))
        store.create(fields("+15550011132"))
        store.copy.rebuild(sql)
        redis.hdel(keys.REGISTRY, number_route("+15550011131"), id_route(missing.id))
        store.copy.forget()

        found = store.copied(number_route("+15550011131"))

        assert missing.id == (found.id if found else None)

    def test_a_bot_asked_for_near_its_expiry_is_refreshed_ahead(self, store: BotStore, redis: redis_lib.Redis) -> None:
        """In the last fifth of its entry's life a lookup loads the bot again, so it never expires under its callers."""
        bot = store.create(fields("+15550011201"))
        cache = holding(BotCache(store, redis, ttl=1.0), bot)

        time.sleep(0.9)
        with counted_loads(store) as ahead:
            cache.by_id(bot.id)
        time.sleep(0.3)  # past the first entry's life
        with counted_loads(store) as after:
            cache.by_id(bot.id)

        assert (1, 0) == (len(ahead), len(after))


@pytest.mark.parametrize("copy", ["opt-out", "handoff"])
def test_a_missing_copy_is_rebuilt_once_for_hundreds_of_callers(
        copy: str, bot: Bot, redis: redis_lib.Redis, sql: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The opt-out and handoff copies, flushed, asked for by 300 threads at once: the database is read for one rebuild."""
    load = (lambda: optout.load_copy(sql, redis, bot.number)) if copy == "opt-out" else (
        lambda: handoff.load_copy(sql, redis, bot.id))
    module = optout if copy == "opt-out" else handoff
    with counted_queries(sql) as one_rebuild:
        load()
    redis.flushdb()
    monkeypatch.setattr(module, "_load_copy", slowed(module._load_copy))

    with counted_queries(sql) as statements:
        _, errors = TestSingleFlight.all_at_once(load, TestSingleFlight.CALLERS)

    assert ([], len(one_rebuild)) == (errors, len(statements))
