"""The bot registry: bots live in the `bots` table; the hot paths read them through a BotCache.

A change commits to the database, then every BotCache drops what it holds: those of this process at
once, those of other processes when they hear it on Redis (keys.BOTS_CHANGED_CHANNEL). A cache's
TTL bounds how stale a bot can be if that announcement is lost.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis as redis_lib
from sqlalchemy import Engine, Row, delete, select, update
from sqlalchemy.exc import IntegrityError

from shared import keys
from shared.crypto import Vault
from shared.db import insert, transaction
from shared.logging import get_logger
from shared.schema import bots

log = get_logger(__name__)

# Fields the registry API accepts, as spelled in its JSON and query strings.
NAME, USER_TYPE, ACCOUNT_SID, AUTH_TOKEN, NUMBER = (
    "name", "user-type", "twilio-account-sid", "twilio-auth-token", "main-phone-number",
)
ENGINE_URL, PACE, FALLBACK = "engine-url", "messages-per-second", "fallback-message"
MAX_REPLIES, MAX_SEGMENTS, MAX_PER_DAY, MAX_PER_MINUTE, PUSH_WINDOW, COLD_PUSH, MAX_ENGINE_CALLS = (
    "max-replies", "max-segments", "max-messages-per-day", "max-replies-per-minute", "push-window-days",
    "allow-cold-push", "max-concurrent-engine-calls",
)


@dataclass(frozen=True)
class Limits:
    """What one bot may make the service do, so a careless or hostile engine (or a loop with another
    bot) cannot run up unbounded SMS or hold every worker. A bot's own settings, with these defaults."""

    max_replies: int = 10  # messages one engine answer may send; more are cut, and logged
    max_segments: int = 30  # segments one engine answer may send; a long text is cut at a word
    max_messages_per_day: int = 10_000  # sends per UTC day across all recipients; past it, held back; 0: none
    max_replies_per_minute: int = 20  # per person: more and the conversation is stopped for the minute; 0: none
    push_window_days: int = 30  # the engine callback pushes only to people who wrote within this long
    allow_cold_push: bool = False  # ...unless this is set
    max_concurrent_engine_calls: int | None = None  # in one worker process; None: a quarter of its threads

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any] | None) -> Limits:
        """The limits a bot's stored settings (API names) make, defaults for the rest."""
        given = {LIMIT_ATTRIBUTES[name]: value for name, value in (stored or {}).items() if name in LIMIT_ATTRIBUTES}
        return cls(**given)

    def shown(self) -> dict[str, Any]:
        return {name: getattr(self, attribute) for name, attribute in LIMIT_ATTRIBUTES.items()}


# The API's names of the limits -> Limits' attributes.
LIMIT_ATTRIBUTES = {
    MAX_REPLIES: "max_replies", MAX_SEGMENTS: "max_segments", MAX_PER_DAY: "max_messages_per_day",
    MAX_PER_MINUTE: "max_replies_per_minute", PUSH_WINDOW: "push_window_days", COLD_PUSH: "allow_cold_push",
    MAX_ENGINE_CALLS: "max_concurrent_engine_calls",
}
KNOWN_FIELDS = frozenset({NAME, USER_TYPE, ACCOUNT_SID, AUTH_TOKEN, NUMBER, ENGINE_URL, PACE, FALLBACK, *LIMIT_ATTRIBUTES})
# Never kept as user fields: the API shows its own values under these names (or once did).
_INTERNAL = frozenset({"id", "twilio-auth-token-encrypted", "extra", "created-at", "updated-at"})
DEFAULT_MESSAGES_PER_SECOND = 1.0
# Decrypted tokens kept per store (see BotStore._token); past this many, the memo starts afresh.
LOADED_LIMIT = 1024
CACHE_TTL_SECONDS = 10.0
# An unknown number is remembered for less: if its registration's announcement is lost, it works
# within this long. Long enough that a flood of webhooks to it costs one query per this.
NEGATIVE_TTL_SECONDS = 5.0
CACHE_LIMIT = 4096


def shown_url(url: str | None) -> str | None:
    """An engine URL as the API shows it: query values and any user:password@ replaced by ***, since
    an engine's URL may carry a key (`?token=...`); the worker alone reads the URL whole."""
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if "@" in parts.netloc:
        netloc = "***@" + netloc
    query = "&".join(f"{name}=***" if sep else name
                     for name, sep, _ in (pair.partition("=") for pair in parts.query.split("&")) if name)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def new_engine_token() -> str:
    """A bot's engine token: it authorizes that bot's engine callback, nothing else."""
    return "mset_" + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class NumberTaken(Exception):
    def __init__(self, number: str) -> None:
        super().__init__(f"{number} already belongs to another bot")
        self.number = number


class BotNotFound(Exception):
    pass


@dataclass(frozen=True)
class Bot:
    id: int
    name: str
    account_sid: str
    auth_token: str = field(repr=False)
    number: str
    engine_url: str | None = None
    messages_per_second: float = DEFAULT_MESSAGES_PER_SECOND
    fallback_message: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    # SHA-256 (hex) of the bot's engine token; None until one is issued. Never shown.
    engine_token_hash: str | None = field(default=None, repr=False)

    def accepts_engine_token(self, token: str) -> bool:
        """Whether `token` is this bot's engine token (compared in constant time, by its hash)."""
        if not self.engine_token_hash or not token:
            return False
        return hmac.compare_digest(token_hash(token), self.engine_token_hash)

    def public(self) -> dict[str, Any]:
        """The bot as the API shows it: everything but the auth token; every limit, set or default."""
        shown: dict[str, Any] = dict(self.extra)
        shown.update({
            "id": self.id, NAME: self.name, USER_TYPE: "machine", ACCOUNT_SID: self.account_sid,
            NUMBER: self.number, ENGINE_URL: shown_url(self.engine_url), PACE: self.messages_per_second,
            FALLBACK: self.fallback_message, **self.limits.shown(),
        })
        return shown


class BotStore:
    """The registry's reads and writes over the `bots` table; `redis` only carries change announcements."""

    def __init__(self, engine: Engine, redis: redis_lib.Redis, vault: Vault) -> None:
        self._engine = engine
        self._redis = redis
        self._vault = vault
        self._tokens: dict[str, str] = {}

    def create(self, fields: Mapping[str, Any]) -> Bot:
        return self.create_with_token(fields)[0]

    def create_with_token(self, fields: Mapping[str, Any]) -> tuple[Bot, str]:
        """The new bot, and its engine token (kept only as a hash: this is the one time it is known)."""
        engine_token = new_engine_token()
        row = {**self._row(fields, self._vault.encrypt(fields[AUTH_TOKEN])), "engine_token_hash": token_hash(engine_token)}
        now = time.time()
        try:
            with transaction(self._engine) as connection:
                # Checked first so a refused number does not use up an id (a sequence never gives one back).
                if self._owner(connection, row["main_phone_number"]) is not None:
                    raise NumberTaken(row["main_phone_number"])
                result = connection.execute(
                    insert(connection, bots).values(**row, created_at=now, updated_at=now))
                bot_id = int(result.inserted_primary_key[0])
        except IntegrityError:  # the unique number: a concurrent create got there first
            raise NumberTaken(row["main_phone_number"]) from None
        self._announce(bot_id)
        return self._bot({**row, "id": bot_id}), engine_token

    def rotate_engine_token(self, bot_id: int) -> str:
        """A new engine token for the bot; the old one stops working at once (every cache hears it)."""
        engine_token = new_engine_token()
        with transaction(self._engine) as connection:
            changed = connection.execute(update(bots).where(bots.c.id == bot_id).values(
                engine_token_hash=token_hash(engine_token), updated_at=time.time())).rowcount
        if not changed:
            raise BotNotFound(bot_id)
        self._announce(bot_id)
        return engine_token

    def get(self, bot_id: int) -> Bot | None:
        return self._one(bots.c.id == bot_id)

    def by_number(self, number: str) -> Bot | None:
        return self._one(bots.c.main_phone_number == number)

    def numbers(self) -> frozenset[str]:
        """Every bot's number."""
        with self._engine.connect() as connection:
            return frozenset(connection.execute(select(bots.c.main_phone_number)).scalars())

    def all(self) -> list[Bot]:
        with self._engine.connect() as connection:
            rows = connection.execute(select(bots).order_by(bots.c.id)).all()
        return [self._bot(row._mapping) for row in rows]

    def update(self, bot_id: int, changes: Mapping[str, Any]) -> Bot:
        """Apply `changes`; the row is locked meanwhile, and a number another bot has is refused."""
        try:
            with transaction(self._engine) as connection:
                old = connection.execute(select(bots).where(bots.c.id == bot_id).with_for_update()).first()
                if old is None:
                    raise BotNotFound(bot_id)
                merged = {**_fields(old), ENGINE_URL: self._engine_url(old.engine_url), **changes}
                token = changes.get(AUTH_TOKEN)
                row = self._row(merged, self._vault.encrypt(token) if token else old.auth_token_encrypted)
                if self._owner(connection, row["main_phone_number"]) not in (None, bot_id):
                    raise NumberTaken(row["main_phone_number"])
                connection.execute(update(bots).where(bots.c.id == bot_id).values(**row, updated_at=time.time()))
        except IntegrityError:  # only a new number can collide: a concurrent write took it
            raise NumberTaken(changes.get(NUMBER, "")) from None
        self._announce(bot_id)
        return self._bot({**row, "id": bot_id, "engine_token_hash": old.engine_token_hash})

    def delete(self, bot_id: int) -> bool:
        with transaction(self._engine) as connection:
            deleted = connection.execute(delete(bots).where(bots.c.id == bot_id)).rowcount > 0
        if deleted:
            self._announce(bot_id)
        return deleted

    def _one(self, condition: Any) -> Bot | None:
        with self._engine.connect() as connection:
            row = connection.execute(select(bots).where(condition)).first()
        return None if row is None else self._bot(row._mapping)

    @staticmethod
    def _owner(connection: Any, number: str) -> int | None:
        return connection.execute(select(bots.c.id).where(bots.c.main_phone_number == number)).scalar()

    def _announce(self, bot_id: int) -> None:
        """After the commit: every cache drops what it holds, this process's at once."""
        for cache in list(_caches):
            cache.clear()
        try:
            self._redis.publish(keys.BOTS_CHANGED_CHANNEL, str(bot_id))
        except redis_lib.RedisError as error:
            # The change is committed; other processes' caches see it when their entries expire.
            log.warning("bots.change_not_announced", bot_id=bot_id, error=str(error))

    def _row(self, fields: Mapping[str, Any], token_encrypted: str) -> dict[str, Any]:
        return {
            "name": fields.get(NAME, ""),
            "account_sid": fields[ACCOUNT_SID],
            "auth_token_encrypted": token_encrypted,
            "main_phone_number": fields[NUMBER],
            "engine_url": self._vault.encrypt(fields[ENGINE_URL]) if fields.get(ENGINE_URL) else None,
            "messages_per_second": float(fields.get(PACE) or DEFAULT_MESSAGES_PER_SECOND),
            "fallback_message": fields.get(FALLBACK),
            "extra": {k: v for k, v in fields.items() if k not in KNOWN_FIELDS and k not in _INTERNAL},
            # None unsets a limit (back to its default).
            "limits": {k: fields[k] for k in LIMIT_ATTRIBUTES if fields.get(k) is not None},
        }

    def _bot(self, row: Mapping[str, Any]) -> Bot:
        return Bot(
            id=int(row["id"]),
            name=row["name"],
            account_sid=row["account_sid"],
            auth_token=self._token(row["auth_token_encrypted"]),
            number=row["main_phone_number"],
            engine_url=self._engine_url(row["engine_url"]),
            messages_per_second=float(row["messages_per_second"]),
            fallback_message=row["fallback_message"],
            extra=dict(row["extra"] or {}),
            limits=Limits.from_stored(row.get("limits")),
            engine_token_hash=row.get("engine_token_hash"),
        )

    def _engine_url(self, stored: str | None) -> str | None:
        """Engine URLs are stored encrypted like auth tokens (they may carry a key); a row written by
        an earlier release holds it in plain text, and is encrypted by its next update."""
        if not stored or "://" in stored:
            return stored
        return self._token(stored)

    def _token(self, encrypted: str) -> str:
        """Decrypting costs more than reading the row, and the same few bots are read again and
        again: each ciphertext is decrypted once (a new token is a new ciphertext, never stale)."""
        token = self._tokens.get(encrypted)
        if token is None:
            if len(self._tokens) >= LOADED_LIMIT:
                self._tokens.clear()
            token = self._tokens[encrypted] = self._vault.decrypt(encrypted)
        return token


def _fields(row: Row[Any]) -> dict[str, Any]:
    """A stored bot in the API's spelling, as an update merges its changes into it."""
    return {
        **row.extra, **(row.limits or {}), NAME: row.name, ACCOUNT_SID: row.account_sid, NUMBER: row.main_phone_number,
        ENGINE_URL: row.engine_url, PACE: row.messages_per_second, FALLBACK: row.fallback_message,
    }


# Every BotCache of this process, so a change made here empties them before the call returns.
_caches: weakref.WeakSet[BotCache] = weakref.WeakSet()


class BotCache:
    """Bots by number (the webhook) and by id (the worker): a short-lived in-process cache.

    A miss reads the database; unknown numbers and ids are remembered too (for less), so a flood of
    webhooks to an unregistered number costs no query per request. Any change announcement empties
    the whole cache. Nothing is kept while the listener is not subscribed: a change could go unheard.
    """

    def __init__(self, store: BotStore, redis: redis_lib.Redis, ttl: float = CACHE_TTL_SECONDS,
                 negative_ttl: float = NEGATIVE_TTL_SECONDS, limit: int = CACHE_LIMIT) -> None:
        self._store = store
        self._redis = redis
        self._ttl, self._negative_ttl, self._limit = ttl, min(ttl, negative_ttl), limit
        self._entries: dict[tuple[str, Any], tuple[float, Any]] = {}
        # Bumped by every clear: a lookup that read the database before a change was announced
        # must not store what it read after the clear.
        self._generation = 0
        self._subscribed = False
        self._listener: threading.Thread | None = None
        self._lock = threading.Lock()
        _caches.add(self)

    @property
    def listening(self) -> bool:
        """Whether change announcements are heard (and so lookups are kept)."""
        return self._subscribed

    def by_number(self, number: str) -> Bot | None:
        return self._lookup(("number", number), lambda: self._store.by_number(number))

    def by_id(self, bot_id: int) -> Bot | None:
        return self._lookup(("id", int(bot_id)), lambda: self._store.get(int(bot_id)))

    def is_bot_number(self, number: str) -> bool:
        """Whether `number` belongs to a bot of this service (whose texts no bot answers: two bots
        would answer each other forever). All numbers are read in one query and kept like a bot."""
        return number in self._lookup(("numbers", None), self._store.numbers)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries = {}

    def _lookup(self, key: tuple[str, Any], load: Callable[[], Any]) -> Any:
        self._ensure_listener()
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        generation = self._generation
        bot = load()
        self._remember(key, bot, generation, now)
        return bot

    def _remember(self, key: tuple[str, Any], bot: Any, generation: int, now: float) -> None:
        with self._lock:
            if not self._subscribed or generation != self._generation:
                return
            if key not in self._entries and len(self._entries) >= self._limit:
                del self._entries[next(iter(self._entries))]  # the oldest: entries expire in about that order
            self._entries[key] = (now + (self._ttl if bot is not None else self._negative_ttl), bot)

    def _set_subscribed(self, subscribed: bool) -> None:
        with self._lock:
            self._subscribed = subscribed
            self._generation += 1
            self._entries = {}

    def _ensure_listener(self) -> None:
        if self._listener is not None:
            return
        with self._lock:
            if self._listener is None:
                self._listener = threading.Thread(target=_listen, args=(weakref.ref(self), self._redis),
                                                  name="bot-cache-invalidation", daemon=True)
                self._listener.start()


# How often the listener looks up from an idle channel (to stop once its cache is gone).
_LISTEN_POLL_SECONDS = 1.0


def _listen(cache_ref: weakref.ref[BotCache], redis: redis_lib.Redis) -> None:
    """Empty the cache on every announcement, and on every (re)subscription: anything kept before it
    took effect may be stale. Holds the cache weakly, ending with it."""
    while cache_ref() is not None:
        pubsub = redis.pubsub()
        try:
            pubsub.subscribe(keys.BOTS_CHANGED_CHANNEL)
            while (cache := cache_ref()) is not None:
                message = pubsub.get_message(timeout=_LISTEN_POLL_SECONDS)
                if message is not None and message["type"] == "subscribe":
                    cache._set_subscribed(True)
                elif message is not None and message["type"] == "message":
                    cache.clear()
                del cache
        except Exception:  # noqa: BLE001 - the cache must outlive Redis restarts
            log.warning("bot_cache.listener_reconnecting")
            cache = cache_ref()
            if cache is not None:
                cache._set_subscribed(False)
            del cache
            time.sleep(1)
        finally:
            pubsub.close()
