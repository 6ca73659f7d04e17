"""The bot registry: bots live in Redis, found by id or, in one round trip, by their phone number."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib

from shared import keys
from shared.crypto import Vault
from shared.logging import get_logger

log = get_logger(__name__)

# Fields the registry API accepts, as spelled in its JSON and query strings.
NAME, USER_TYPE, ACCOUNT_SID, AUTH_TOKEN, NUMBER = (
    "name", "user-type", "twilio-account-sid", "twilio-auth-token", "main-phone-number",
)
ENGINE_URL, PACE, FALLBACK = "engine-url", "messages-per-second", "fallback-message"
KNOWN_FIELDS = frozenset({NAME, USER_TYPE, ACCOUNT_SID, AUTH_TOKEN, NUMBER, ENGINE_URL, PACE, FALLBACK})
DEFAULT_MESSAGES_PER_SECOND = 1.0
_ENCRYPTED_TOKEN = "twilio-auth-token-encrypted"
# Decoded records kept per store (see BotStore.load); past this many, the memo starts afresh.
LOADED_LIMIT = 1024


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

    def public(self) -> dict[str, Any]:
        """The bot as the API shows it: everything but the auth token."""
        shown: dict[str, Any] = dict(self.extra)
        shown.update({
            "id": self.id, NAME: self.name, USER_TYPE: "machine", ACCOUNT_SID: self.account_sid,
            NUMBER: self.number, ENGINE_URL: self.engine_url, PACE: self.messages_per_second,
            FALLBACK: self.fallback_message,
        })
        return shown


# GET the id the number points at, then the record: one round trip for the hot paths.
_BY_NUMBER = """
local id = redis.call('GET', KEYS[1])
if not id then return false end
return redis.call('GET', ARGV[1] .. id)
"""

# Claim the number, take the next id and write the record; a taken number changes nothing.
# The record arrives with "id" as its first key holding a placeholder, replaced here (no JSON
# round trip in Lua, whose cjson would turn an empty object into a list).
_ID_PLACEHOLDER = '"__ID__"'
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local id = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], id)
redis.call('SET', ARGV[2] .. id, (string.gsub(ARGV[1], '"__ID__"', tostring(id), 1)))
redis.call('SADD', KEYS[3], id)
return id
"""


class BotStore:
    def __init__(self, redis: redis_lib.Redis, vault: Vault) -> None:
        self._redis = redis
        self._vault = vault
        self._by_number = redis.register_script(_BY_NUMBER)
        self._create = redis.register_script(_CREATE)
        self._loaded: dict[str, Bot] = {}

    def create(self, fields: Mapping[str, Any]) -> Bot:
        record = self._record(0, fields)
        number = record[NUMBER]
        template = json.dumps({**record, "id": "__ID__"})
        assert template.startswith('{"id": ' + _ID_PLACEHOLDER)  # the script replaces the first occurrence
        bot_id = self._create(keys=[keys.bot_by_number(number), keys.BOT_NEXT_ID, keys.BOT_IDS],
                              args=[template, keys.BOT_PREFIX])
        if not bot_id:
            raise NumberTaken(number)
        return self._bot({**record, "id": int(bot_id)})

    def get(self, bot_id: int) -> Bot | None:
        return self.load(self._redis.get(keys.bot(bot_id)))

    def load(self, raw: str | None) -> Bot | None:
        """The bot a stored record (as read from keys.bot) describes. Decrypting the token costs more
        than reading the record, and the hot paths load the same few bots again and again: each
        record text is decoded once. Keyed by the whole text, so a changed bot is never served stale."""
        if not raw:
            return None
        bot = self._loaded.get(raw)
        if bot is None:
            if len(self._loaded) >= LOADED_LIMIT:
                self._loaded.clear()
            bot = self._loaded[raw] = self._bot(json.loads(raw))
        return bot

    def all(self) -> list[Bot]:
        ids = sorted(int(bot_id) for bot_id in self._redis.smembers(keys.BOT_IDS))
        if not ids:
            return []
        records = self._redis.mget([keys.bot(bot_id) for bot_id in ids])
        return [self._bot(json.loads(raw)) for raw in records if raw]

    def by_number(self, number: str) -> Bot | None:
        return self.load(self._by_number(keys=[keys.bot_by_number(number)], args=[keys.BOT_PREFIX]))

    def update(self, bot_id: int, changes: Mapping[str, Any]) -> Bot:
        """Apply `changes`; a new number moves the index atomically with the record."""
        record_key = keys.bot(bot_id)
        updated: dict[str, Any] = {}

        def apply(pipe: redis_lib.client.Pipeline) -> None:
            if NUMBER in changes:
                # Watched too, so two bots cannot claim one number at once.
                pipe.watch(keys.bot_by_number(changes[NUMBER]))
            raw = pipe.get(record_key)
            if not raw:
                raise BotNotFound(bot_id)
            old = json.loads(raw)
            new = self._record(bot_id, {**old["extra"], **old, **changes}, existing=old)
            owner = pipe.get(keys.bot_by_number(new[NUMBER]))
            if owner is not None and int(owner) != bot_id:
                raise NumberTaken(new[NUMBER])
            pipe.multi()
            if new[NUMBER] != old[NUMBER]:
                pipe.delete(keys.bot_by_number(old[NUMBER]))
            pipe.set(keys.bot_by_number(new[NUMBER]), bot_id)
            pipe.set(record_key, json.dumps(new))
            pipe.publish(keys.BOTS_CHANGED_CHANNEL, json.dumps([old[NUMBER], new[NUMBER]]))
            updated.update(new)

        self._redis.transaction(apply, record_key)
        return self._bot(updated)

    def delete(self, bot_id: int) -> bool:
        record_key = keys.bot(bot_id)
        deleted: list[str] = []

        def remove(pipe: redis_lib.client.Pipeline) -> None:
            raw = pipe.get(record_key)
            if not raw:
                return
            number = json.loads(raw)[NUMBER]
            pipe.multi()
            pipe.delete(record_key, keys.bot_by_number(number))
            pipe.srem(keys.BOT_IDS, bot_id)
            pipe.publish(keys.BOTS_CHANGED_CHANNEL, json.dumps([number]))
            deleted.append(number)

        self._redis.transaction(remove, record_key)
        return bool(deleted)

    def _record(self, bot_id: int, fields: Mapping[str, Any], existing: Mapping[str, Any] | None = None) -> dict[str, Any]:
        existing = existing or {}
        token = fields.get(AUTH_TOKEN)
        encrypted = self._vault.encrypt(token) if token else existing.get(_ENCRYPTED_TOKEN)
        now = time.time()
        return {
            "id": bot_id,
            NAME: fields.get(NAME, existing.get(NAME, "")),
            ACCOUNT_SID: fields[ACCOUNT_SID],
            _ENCRYPTED_TOKEN: encrypted,
            NUMBER: fields[NUMBER],
            ENGINE_URL: fields.get(ENGINE_URL),
            PACE: float(fields.get(PACE) or DEFAULT_MESSAGES_PER_SECOND),
            FALLBACK: fields.get(FALLBACK),
            "extra": {k: v for k, v in fields.items() if k not in KNOWN_FIELDS and k not in _INTERNAL},
            "created-at": existing.get("created-at", now),
            "updated-at": now,
        }

    def _bot(self, record: Mapping[str, Any]) -> Bot:
        return Bot(
            id=int(record["id"]),
            name=record.get(NAME, ""),
            account_sid=record[ACCOUNT_SID],
            auth_token=self._vault.decrypt(record[_ENCRYPTED_TOKEN]),
            number=record[NUMBER],
            engine_url=record.get(ENGINE_URL),
            messages_per_second=float(record.get(PACE) or DEFAULT_MESSAGES_PER_SECOND),
            fallback_message=record.get(FALLBACK),
            extra=record.get("extra", {}),
        )


_INTERNAL = frozenset({"id", _ENCRYPTED_TOKEN, "extra", "created-at", "updated-at"})


class BotCache:
    """Bots by number for the webhook's hot path: a short-lived in-process cache.

    Registry changes are published on Redis; a listener thread drops the changed numbers, so an
    update reaches every web process at once. The TTL bounds staleness if that channel is lost.
    """

    def __init__(self, store: BotStore, redis: redis_lib.Redis, ttl: float = 10.0) -> None:
        self._store = store
        self._redis = redis
        self._ttl = ttl
        self._entries: dict[str, tuple[float, Bot]] = {}
        self._listener: threading.Thread | None = None
        self._lock = threading.Lock()

    def by_number(self, number: str) -> Bot | None:
        self._ensure_listener()
        now = time.monotonic()
        hit = self._entries.get(number)
        if hit is not None and hit[0] > now:
            return hit[1]
        bot = self._store.by_number(number)
        if bot is not None and self._listener is not None:
            self._entries[number] = (now + self._ttl, bot)
        return bot

    def invalidate(self, *numbers: str) -> None:
        for number in numbers:
            self._entries.pop(number, None)

    def _ensure_listener(self) -> None:
        if self._listener is not None:
            return
        with self._lock:
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="bot-cache-invalidation", daemon=True)
                self._listener.start()

    def _listen(self) -> None:
        while True:
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(keys.BOTS_CHANGED_CHANNEL)
                # Anything cached before the subscription took effect may be stale.
                self._entries.clear()
                for message in pubsub.listen():
                    self.invalidate(*json.loads(message["data"]))
            except Exception:  # noqa: BLE001 - the cache must outlive Redis restarts
                log.warning("bot_cache.listener_reconnecting")
                self._entries.clear()
                time.sleep(1)
