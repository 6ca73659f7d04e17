"""The bot registry: bots live in the `bots` table; the hot paths read them through a BotCache.

A change commits to the database, then writes the bot into the registry's copy in Redis
(RegistryCopy: every bot's row, secrets still encrypted, and which number or Messaging Service
routes to it), then every BotCache drops what it holds: those of this process at once, those of
other processes when they hear it on Redis (keys.BOTS_CHANGED_CHANNEL). A cache's TTL bounds how
stale a bot can be if that announcement is lost.

The hot paths never read the database: a BotCache loads from the copy, and the copy is rebuilt from
the database only when it is missing (a flush). So while the database is unreachable, texts to
every registered bot are accepted and answered, by processes started during the outage too.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit, urlunsplit

import redis as redis_lib
from sqlalchemy import Connection, Engine, Row, delete, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from shared import keys, keywords, optout, poolnumbers
from shared.crypto import Vault
from shared.db import insert, transaction
from shared.flight import SingleFlight
from shared.logging import REDACTED, get_logger, is_secret_name, redact_path
from shared.poolnumbers import pool_number_owner
from shared.redis import script
from shared.schema import bot_numbers, bots, handoffs

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
MAX_SEGMENTS_PER_DAY, MAX_QUEUED = "max-segments-per-day", "max-queued-replies"
# Conversation controls (human handoff, merging a burst of texts): see shared.handoff and worker.conversation.
HANDOFF_URL, HANDOFF_SECRET, HANDOFF_TIMEOUT, MERGE_WINDOW = (
    "handoff-url", "handoff-secret", "handoff-timeout", "merge-window-ms",
)
# Messaging Services and number pools: see webhook.inbound and worker.outbound.
SERVICE_SID, PHONE_NUMBERS, VALIDITY, SMART_ENCODED, SHORTEN_URLS = (
    "twilio-messaging-service-sid", "phone-numbers", "validity-period", "smart-encoded", "shorten-urls",
)
# Keywords and their answers: see shared.keywords and worker.conversation.
OPT_OUT_WORDS, OPT_IN_WORDS, HELP_WORDS, HELP_MESSAGE, OPT_OUT_MESSAGE, OPT_IN_MESSAGE = (
    "opt-out-keywords", "opt-in-keywords", "help-keywords", "help-message", "opt-out-message", "opt-in-message",
)
# Quiet hours: see shared.schedule.
QUIET_HOURS, QUIET_ZONE = "quiet-hours", "quiet-hours-time-zone"


# --- A bot's settings, kept in its `limits` column: only those an operator set; the rest take the
# release's defaults. Each group maps the API's names to its attributes.

LIMIT_ATTRIBUTES = {
    MAX_REPLIES: "max_replies", MAX_SEGMENTS: "max_segments", MAX_PER_DAY: "max_messages_per_day",
    MAX_PER_MINUTE: "max_replies_per_minute", PUSH_WINDOW: "push_window_days", COLD_PUSH: "allow_cold_push",
    MAX_ENGINE_CALLS: "max_concurrent_engine_calls", MAX_SEGMENTS_PER_DAY: "max_segments_per_day",
    MAX_QUEUED: "max_queued_replies",
}
CONTROL_ATTRIBUTES = {HANDOFF_TIMEOUT: "handoff_timeout", MERGE_WINDOW: "merge_window_ms"}
SENDING_ATTRIBUTES = {VALIDITY: "validity_period", SMART_ENCODED: "smart_encoded", SHORTEN_URLS: "shorten_urls"}
HOURS_ATTRIBUTES = {QUIET_HOURS: "quiet_hours", QUIET_ZONE: "time_zone"}
KEYWORD_ATTRIBUTES = {
    OPT_OUT_WORDS: "opt_out", OPT_IN_WORDS: "opt_in", HELP_WORDS: "help", HELP_MESSAGE: "help_message",
    OPT_OUT_MESSAGE: "opt_out_message", OPT_IN_MESSAGE: "opt_in_message",
}


class _Settings:
    """A group of a bot's settings: read from what is stored (the API's names), shown by the API."""

    ATTRIBUTES: ClassVar[Mapping[str, str]]

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any] | None) -> Self:
        """The settings a bot's stored ones make, defaults for the rest."""
        return cls(**{cls.ATTRIBUTES[name]: value for name, value in (stored or {}).items() if name in cls.ATTRIBUTES})

    def shown(self) -> dict[str, Any]:
        return {name: getattr(self, attribute) for name, attribute in self.ATTRIBUTES.items()}


@dataclass(frozen=True)
class Limits(_Settings):
    """What one bot may make the service do, so a careless or hostile engine (or a loop with another
    bot) cannot run up unbounded SMS or hold every worker."""

    ATTRIBUTES: ClassVar[Mapping[str, str]] = LIMIT_ATTRIBUTES
    max_replies: int = 10  # messages one engine answer may send; more are cut, and logged
    max_segments: int = 30  # segments one engine answer may send; a long text is cut at a word
    max_messages_per_day: int = 10_000  # sends per UTC day across all recipients; past it, held back; 0: none
    max_replies_per_minute: int = 20  # per person: more and the conversation is stopped for the minute; 0: none
    push_window_days: int = 30  # the engine callback pushes only to people who wrote within this long
    allow_cold_push: bool = False  # ...unless this is set
    max_concurrent_engine_calls: int | None = None  # in one worker process; None: a quarter of its threads
    max_segments_per_day: int = 30_000  # segments (what Twilio bills) per UTC day; past it, held back; 0: none
    max_queued_replies: int = 50  # replies waiting in one person's outbox past which a push is refused (429)


@dataclass(frozen=True)
class Controls(_Settings):
    """How a bot's conversations behave around its engine (shared.handoff, worker.conversation)."""

    ATTRIBUTES: ClassVar[Mapping[str, str]] = CONTROL_ATTRIBUTES
    handoff_timeout: int = 24 * 3600  # a conversation handed to a human resumes by itself after this long; 0: never
    merge_window_ms: int = 0  # texts a person sends within this of each other are one turn for the engine; 0: off


@dataclass(frozen=True)
class Sending(_Settings):
    """Twilio's send options a bot sets (None: not sent, Twilio's default applies)."""

    ATTRIBUTES: ClassVar[Mapping[str, str]] = SENDING_ATTRIBUTES
    validity_period: int | None = None  # ValidityPeriod, seconds a message may wait in Twilio's queue
    smart_encoded: bool | None = None  # SmartEncoded: Unicode look-alikes become GSM-7 characters
    shorten_urls: bool | None = None  # ShortenUrls: only with a Messaging Service


@dataclass(frozen=True)
class Keywords(_Settings):
    """The whole texts that opt a person out, back in, or ask for help (shared.keywords), and the
    answers the service itself sends to them (None: none; the engine is told of the event)."""

    ATTRIBUTES: ClassVar[Mapping[str, str]] = KEYWORD_ATTRIBUTES
    opt_out: tuple[str, ...] = keywords.OPT_OUT_KEYWORDS
    opt_in: tuple[str, ...] = keywords.OPT_IN_KEYWORDS
    help: tuple[str, ...] = keywords.HELP_KEYWORDS
    help_message: str | None = None  # answers a help keyword instead of the engine
    opt_out_message: str | None = None  # the one confirmation after an opt-out
    opt_in_message: str | None = None  # the confirmation after an opt-in

    @cached_property
    def _events(self) -> dict[str, str]:
        return keywords.events(self.opt_out, self.opt_in, self.help)

    def event_of(self, body: str | None) -> str:
        """What a whole text means: an opt-out, an opt-in, a help request, or a message."""
        return keywords.event_of(body, self._events)

    def conflict(self) -> tuple[str, str] | None:
        """A keyword listed twice, in one list or in two ("BAJA" and "bája" are one keyword), as (the
        later list's field, the problem); None when there is none."""
        seen: dict[str, str] = {}
        for name in (OPT_OUT_WORDS, OPT_IN_WORDS, HELP_WORDS):
            listed: set[str] = set()
            for word in getattr(self, KEYWORD_ATTRIBUTES[name]):
                compared = keywords.normalized(word)
                if compared in listed:
                    return name, f"{word!r} is listed twice (case, accents and punctuation aside)"
                listed.add(compared)
                other = seen.setdefault(compared, name)
                if other != name:
                    return name, f"{word!r} is also in {other}: a keyword can mean one thing only"
        return None


@dataclass(frozen=True)
class Hours(_Settings):
    """When the bot's people may get messages they did not just ask for (shared.schedule)."""

    ATTRIBUTES: ClassVar[Mapping[str, str]] = HOURS_ATTRIBUTES
    quiet_hours: str | None = None  # "21:00-08:00" in the recipient's time; None: none
    time_zone: str | None = None  # an IANA zone for every recipient; None: each recipient's own


class InvalidBot(ValueError):
    """A bot whose fields, once merged, cannot send: the field at fault and why."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field, self.problem = field_name, problem


class KeywordConflict(InvalidBot):
    """A keyword listed twice, in one list or two: each list valid alone, the whole not (a 409)."""


# A bot's settings kept in its `limits` column (those an operator set; the rest are defaults).
SETTING_NAMES = frozenset({*LIMIT_ATTRIBUTES, *CONTROL_ATTRIBUTES, *SENDING_ATTRIBUTES, *KEYWORD_ATTRIBUTES,
                           *HOURS_ATTRIBUTES})
KNOWN_FIELDS = frozenset({NAME, USER_TYPE, ACCOUNT_SID, AUTH_TOKEN, NUMBER, ENGINE_URL, PACE, FALLBACK, HANDOFF_URL,
                          SERVICE_SID, PHONE_NUMBERS,
                          *SETTING_NAMES})
# Never kept as user fields: the API shows its own values under these names (or once did).
_INTERNAL = frozenset({"id", "twilio-auth-token-encrypted", "extra", "created-at", "updated-at"})
DEFAULT_MESSAGES_PER_SECOND = 1.0
# Decrypted tokens kept per store (see BotStore._token); past this many, the memo starts afresh.
LOADED_LIMIT = 1024
CACHE_TTL_SECONDS = 10.0
# A bot asked for in the last part of its entry's life is loaded again by one caller while the
# others go on with the entry: a busy bot's entry never expires under its callers.
REFRESH_AHEAD_FRACTION = 0.2
# An unknown number is remembered for less: if its registration's announcement is lost, it works
# within this long. Unknown numbers are kept apart from bots, so a flood of them never evicts one.
NEGATIVE_TTL_SECONDS = 5.0
CACHE_LIMIT = 4096
UNKNOWN_LIMIT = 4096
# Bot ids are the database's 4-byte integers: a larger id in a path names no bot, and never reaches a query.
MAX_BOT_ID = 2**31 - 1


SERVICE_SID_PATTERN = r"^MG[0-9a-fA-F]{32}$"
# How a user field named like a secret is stored: this, then its JSON value encrypted with CREDENTIALS_KEY.
SEALED = "sealed:"
# After a handoff secret is rotated, forwards are signed with the old one too for this long.
HANDOFF_SECRET_GRACE_SECONDS = 24 * 3600


def is_service_sid(value: str) -> bool:
    """The shape of a Messaging Service SID (the registry accepts no other)."""
    return re.fullmatch(SERVICE_SID_PATTERN, value) is not None


def shown_url(url: str | None) -> str | None:
    """An engine URL as the API (and the log) shows it: query values and any user:password@ replaced by
    ***, and key-like path segments (Slack's `/services/T.../B.../<key>`) by [redacted], since a URL
    may carry a key; the worker alone reads the URL whole."""
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if "@" in parts.netloc:
        netloc = "***@" + netloc
    query = "&".join(f"{name}=***" if sep else name
                     for name, sep, _ in (pair.partition("=") for pair in parts.query.split("&")) if name)
    return urlunsplit((parts.scheme, netloc, redact_path(parts.path), query, ""))


def new_engine_token() -> str:
    """A bot's engine token: it authorizes that bot's engine callback, nothing else."""
    return "mset_" + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class NumberTaken(Exception):
    """A number (or Messaging Service SID) that another bot has: which, whose, and the field that gave it."""

    def __init__(self, number: str, owner: int | None = None, field_name: str = NUMBER) -> None:
        super().__init__(f"{number} already belongs to {'bot ' + str(owner) if owner else 'another bot'}")
        self.number, self.owner, self.field = number, owner, field_name


class BotNotFound(Exception):
    pass


@dataclass(frozen=True)
class Bot:
    id: int
    name: str
    account_sid: str
    auth_token: str = field(repr=False)
    number: str | None  # main-phone-number; None for a bot that sends only through its messaging service
    engine_url: str | None = None
    messages_per_second: float = DEFAULT_MESSAGES_PER_SECOND
    fallback_message: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    # SHA-256 (hex) of the bot's engine token; None until one is issued. Never shown.
    engine_token_hash: str | None = field(default=None, repr=False)
    controls: Controls = field(default_factory=Controls)
    # Where a handed-off conversation's messages are forwarded, and the key that signs them (shown
    # once, when the URL is first set or the secret rotated).
    handoff_url: str | None = None
    handoff_secret: str | None = field(default=None, repr=False)
    # The secret it replaced, and until when forwards are signed with it too (a rotation's grace period).
    handoff_previous_secret: str | None = field(default=None, repr=False)
    handoff_previous_until: float = 0.0
    # Messaging Services and number pools: the bot's service, its numbers besides `number`, send options.
    messaging_service_sid: str | None = None
    phone_numbers: tuple[str, ...] = ()
    sending: Sending = field(default_factory=Sending)
    keywords: Keywords = field(default_factory=Keywords)
    hours: Hours = field(default_factory=Hours)

    @property
    def numbers(self) -> tuple[str, ...]:
        """Every number the bot answers on: main-phone-number first."""
        return ((self.number,) if self.number else ()) + self.phone_numbers

    def opt_out_key(self, number: str | None = None) -> str:
        """Under what a person's STOP to `number` (one of the bot's) is kept and honoured: the bot's
        Messaging Service when it has one (Twilio's opt-out covers every sender of a service, and
        any of them may be picked to write to the person), else that number (else the main one)."""
        return self.messaging_service_sid or number or self.number or ""

    def handoff_signing_secrets(self, now: float) -> list[str]:
        """The secrets a forward is signed with now: the bot's, and the one it replaced during the grace period."""
        secrets_now = [self.handoff_secret] if self.handoff_secret else []
        if self.handoff_previous_secret and now < self.handoff_previous_until:
            secrets_now.append(self.handoff_previous_secret)
        return secrets_now

    @property
    def pooled(self) -> bool:
        """Whether the number a person texted matters to the reply (the bot has several, or a service)."""
        return bool(self.messaging_service_sid or self.phone_numbers)

    def accepts_engine_token(self, token: str) -> bool:
        """Whether `token` is this bot's engine token (compared in constant time, by its hash)."""
        if not self.engine_token_hash or not token:
            return False
        return hmac.compare_digest(token_hash(token), self.engine_token_hash)

    def public(self) -> dict[str, Any]:
        """The bot as the API shows it: everything but the auth token; every limit, set or default; a
        user field named like a secret only as [redacted] (it is stored encrypted)."""
        shown: dict[str, Any] = {name: REDACTED if is_secret_name(name) else value for name, value in self.extra.items()}
        shown.update({
            "id": self.id, NAME: self.name, USER_TYPE: "machine", ACCOUNT_SID: self.account_sid,
            NUMBER: self.number, ENGINE_URL: shown_url(self.engine_url), PACE: self.messages_per_second,
            FALLBACK: self.fallback_message, **self.limits.shown(), **self.controls.shown(),
            HANDOFF_URL: shown_url(self.handoff_url),
            SERVICE_SID: self.messaging_service_sid, PHONE_NUMBERS: list(self.phone_numbers), **self.sending.shown(),
            **self.keywords.shown(), **self.hours.shown(),
        })
        return shown


# The copy's fields: LOADED once it holds every bot; "b:<id>" a bot's row (JSON, secrets encrypted as
# in the database); "n:<number>" and "s:<service sid>" the id they route to; "r:<id>" the bot's own
# route fields, so a change can drop the ones it no longer has.
LOADED = "#loaded"
_ROW_COLUMNS = tuple(column.name for column in bots.columns if column.name not in ("created_at", "updated_at"))

# KEYS: the copy. ARGV: a bot's id, its row ('' when deleted), then its route fields. Its old routes
# go first, each only if it still names this bot (another bot may have taken the number since).
_PUT_LUA = """
local id = ARGV[1]
local old = redis.call('HGET', KEYS[1], 'r:' .. id)
if old then
  for route in string.gmatch(old, '%S+') do
    if redis.call('HGET', KEYS[1], route) == id then redis.call('HDEL', KEYS[1], route) end
  end
end
if ARGV[2] == '' then return redis.call('HDEL', KEYS[1], 'b:' .. id, 'r:' .. id) end
redis.call('HSET', KEYS[1], 'b:' .. id, ARGV[2], 'r:' .. id, table.concat(ARGV, ' ', 3))
for i = 3, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], id) end
return 1
"""

# KEYS: the copy. ARGV: a route field ("n:...", "s:...") or a bot's row field ("b:<id>").
# Returns {the bot's row or false, whether the copy is LOADED}: one round trip either way.
_LOOKUP_LUA = f"""
local field = ARGV[1]
if string.sub(field, 1, 2) ~= 'b:' then
  local id = redis.call('HGET', KEYS[1], field)
  if not id then return {{false, redis.call('HEXISTS', KEYS[1], '{LOADED}')}} end
  field = 'b:' .. id
end
return {{redis.call('HGET', KEYS[1], field), redis.call('HEXISTS', KEYS[1], '{LOADED}')}}
"""


def number_route(number: str) -> str:
    return f"n:{number}"


def service_route(service_sid: str) -> str:
    return f"s:{service_sid}"


def id_route(bot_id: int) -> str:
    return f"b:{bot_id}"


class RegistryCopy:
    """The registry's copy in Redis: what accepting a text and answering it need of every bot.

    Written after each change commits (a change the database refused writes nothing) and rebuilt
    whole from the database when LOADED is missing. The copy lives as long as Redis keeps it.
    """

    def __init__(self, redis: redis_lib.Redis) -> None:
        self._redis = redis

    def put(self, bot_id: int, row: Mapping[str, Any] | None) -> None:
        """The bot as committed (None: deleted), with its routes."""
        script(self._redis, _PUT_LUA)(keys=[keys.REGISTRY], args=[bot_id, *self._encoded(row)])

    def forget(self) -> None:
        """Drop LOADED, so the next lookup rebuilds the copy from the database (its writes may have been lost)."""
        self._redis.hdel(keys.REGISTRY, LOADED)

    def loaded(self) -> bool:
        """Whether the copy holds every bot."""
        return bool(self._redis.hexists(keys.REGISTRY, LOADED))

    def lookup(self, route: str) -> tuple[dict[str, Any] | None, bool]:
        """The row `route` leads to, if any, and whether the copy is complete (so None means unknown)."""
        row, loaded = script(self._redis, _LOOKUP_LUA)(keys=[keys.REGISTRY], args=[route])
        return (json.loads(row) if row else None), bool(loaded)

    def rebuild(self, engine: Engine) -> None:
        """Replace the copy with every bot in the database. A change written meanwhile makes the
        replacement start again (WATCH), so a rebuild never puts back what a change replaced."""
        for _ in range(5):
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(keys.REGISTRY)
                    mapping: dict[str, str] = {LOADED: "1"}
                    for row in _stored_rows(engine):
                        encoded, *routes = self._encoded(row)
                        mapping.update({route: str(row["id"]) for route in routes})
                        mapping.update({id_route(row["id"]): encoded, f"r:{row['id']}": " ".join(routes)})
                    pipe.multi()
                    pipe.delete(keys.REGISTRY)
                    pipe.hset(keys.REGISTRY, mapping=mapping)
                    pipe.execute()
                    return
                except redis_lib.WatchError:
                    continue
        raise redis_lib.WatchError("the registry kept changing while its copy was rebuilt")

    @staticmethod
    def _encoded(row: Mapping[str, Any] | None) -> list[str]:
        if row is None:
            return [""]
        routes = [number_route(number) for number in
                  dict.fromkeys(([row["main_phone_number"]] if row["main_phone_number"] else [])
                                + list(row.get("phone_numbers") or ()))]
        if row.get("messaging_service_sid"):
            routes.append(service_route(row["messaging_service_sid"]))
        return [json.dumps({name: row.get(name) for name in (*_ROW_COLUMNS, "phone_numbers")}), *routes]


def _stored_rows(engine: Engine) -> list[dict[str, Any]]:
    """Every bot's row with its phone-numbers, as the copy keeps them."""
    with engine.connect() as connection:
        rows = connection.execute(select(bots).order_by(bots.c.id)).all()
        pools = _pools(connection, None)
    return [{**row._mapping, "phone_numbers": list(pools.get(row.id, ()))} for row in rows]


class BotStore:
    """The registry's reads and writes over the `bots` table; `redis` only carries change announcements."""

    def __init__(self, engine: Engine, redis: redis_lib.Redis, vault: Vault) -> None:
        self._engine = engine
        self._redis = redis
        self._vault = vault
        self._tokens: dict[str, str] = {}
        self.copy = RegistryCopy(redis)
        self._rebuilds = SingleFlight()

    def create(self, fields: Mapping[str, Any]) -> Bot:
        return self.create_with_token(fields)[0]

    def create_with_token(self, fields: Mapping[str, Any]) -> tuple[Bot, str]:
        """The new bot, and its engine token (kept only as a hash: this is the one time it is known)."""
        engine_token = new_engine_token()
        row = {**self._row(fields, self._vault.encrypt(fields[AUTH_TOKEN])), "engine_token_hash": token_hash(engine_token),
               "handoff_secret_encrypted": self._new_handoff_secret() if fields.get(HANDOFF_URL) else None}
        now = time.time()
        try:
            with transaction(self._engine) as connection:
                # Checked first so a refused number does not use up an id (a sequence never gives one back).
                self._check_owners(connection, fields, None)
                result = connection.execute(
                    insert(connection, bots).values(**row, created_at=now, updated_at=now))
                bot_id = int(result.inserted_primary_key[0])
                pool = self._save_numbers(connection, bot_id, fields)
                stored = _stored_row(connection, bots.c.id == bot_id)
        except IntegrityError:  # a unique number or service: a concurrent create got there first
            raise self._taken(fields, None) from None
        self._changed(bot_id, stored)
        return self._bot({**row, "id": bot_id, "phone_numbers": pool}), engine_token

    def rotate_engine_token(self, bot_id: int) -> str:
        """A new engine token for the bot; the old one stops working at once (every cache hears it)."""
        engine_token = new_engine_token()
        with transaction(self._engine) as connection:
            changed = connection.execute(update(bots).where(bots.c.id == bot_id).values(
                engine_token_hash=token_hash(engine_token), updated_at=time.time())).rowcount
            stored = _stored_row(connection, bots.c.id == bot_id)
        if not changed:
            raise BotNotFound(bot_id)
        self._changed(bot_id, stored)
        return engine_token

    def rotate_handoff_secret(self, bot_id: int) -> str:
        """A new key for the bot's handoff forwards (shown this once); forwards are signed with it at
        once, and with the one it replaces too for HANDOFF_SECRET_GRACE_SECONDS, so a receiver can
        switch keys without refusing a forward meanwhile."""
        secret = "mshs_" + secrets.token_urlsafe(32)
        with transaction(self._engine) as connection:
            old = connection.execute(select(bots.c.handoff_secret_encrypted).where(bots.c.id == bot_id)
                                     .with_for_update()).first()
            if old is None:
                raise BotNotFound(bot_id)
            previous = self._handoff_secrets(old.handoff_secret_encrypted)[0] if old.handoff_secret_encrypted else None
            # The column holds the secret alone, or after a rotation the secret with the one it replaced.
            sealed = json.dumps({"secret": secret, "previous": previous,
                                 "previous_until": time.time() + HANDOFF_SECRET_GRACE_SECONDS})
            connection.execute(update(bots).where(bots.c.id == bot_id).values(
                handoff_secret_encrypted=self._vault.encrypt(sealed), updated_at=time.time()))
            stored = _stored_row(connection, bots.c.id == bot_id)
        self._changed(bot_id, stored)
        return secret

    def _handoff_secrets(self, encrypted: str) -> tuple[str, str | None, float]:
        """The bot's handoff secret, the one it replaced (or None), and until when that one still signs."""
        plain = self._token(encrypted)
        if not plain.startswith("{"):
            return plain, None, 0.0
        sealed = json.loads(plain)
        return sealed["secret"], sealed.get("previous"), float(sealed.get("previous_until") or 0.0)

    def _new_handoff_secret(self) -> str:
        return self._vault.encrypt("mshs_" + secrets.token_urlsafe(32))

    def get(self, bot_id: int) -> Bot | None:
        return self._one(bots.c.id == bot_id)

    def by_number(self, number: str) -> Bot | None:
        """The bot with `number`, main or further (a bot copied from an earlier release's Redis may
        have no bot_numbers row for its main number)."""
        return self._one((bots.c.main_phone_number == number)
                         | bots.c.id.in_(select(bot_numbers.c.bot_id).where(bot_numbers.c.number == number)))

    def by_service(self, service_sid: str) -> Bot | None:
        return self._one(bots.c.messaging_service_sid == service_sid)

    def numbers(self) -> frozenset[str]:
        """Every bot's numbers."""
        with self._engine.connect() as connection:
            return frozenset(connection.execute(select(bots.c.main_phone_number).where(
                bots.c.main_phone_number.is_not(None)).union(select(bot_numbers.c.number))).scalars())

    def all(self) -> list[Bot]:
        with self._engine.connect() as connection:
            rows = connection.execute(select(bots).order_by(bots.c.id)).all()
            pools = _pools(connection, None)
        return [self._bot({**row._mapping, "phone_numbers": pools.get(row.id, ())}) for row in rows]

    def update(self, bot_id: int, changes: Mapping[str, Any]) -> Bot:
        return self.update_with_secrets(bot_id, changes)[0]

    def update_with_secrets(self, bot_id: int, changes: Mapping[str, Any]) -> tuple[Bot, dict[str, str]]:
        """Apply `changes`; the row is locked meanwhile, and a number another bot has is refused.
        Also the secrets the change made, by API name, for their one showing: a handoff secret is
        made when a handoff URL is set where none was, and dropped with the URL."""
        shown_once: dict[str, str] = {}
        try:
            with transaction(self._engine) as connection:
                old = connection.execute(select(bots).where(bots.c.id == bot_id).with_for_update()).first()
                if old is None:
                    raise BotNotFound(bot_id)
                stored = {**_fields(old), PHONE_NUMBERS: _pools(connection, bot_id).get(bot_id, ())}
                before = _opt_out_keys(stored)
                numbers_before = {number for _, number in _numbers_of(stored)}
                merged = {**stored, ENGINE_URL: self._engine_url(old.engine_url),
                          HANDOFF_URL: self._engine_url(old.handoff_url), **changes}
                token = changes.get(AUTH_TOKEN)
                row = self._row(merged, self._vault.encrypt(token) if token else old.auth_token_encrypted)
                row["handoff_secret_encrypted"] = old.handoff_secret_encrypted if row["handoff_url"] else None
                if row["handoff_url"] and not old.handoff_secret_encrypted:
                    row["handoff_secret_encrypted"] = self._new_handoff_secret()
                    shown_once[HANDOFF_SECRET] = self._handoff_secrets(row["handoff_secret_encrypted"])[0]
                self._check_owners(connection, merged, bot_id)
                connection.execute(update(bots).where(bots.c.id == bot_id).values(**row, updated_at=time.time()))
                pool = self._save_numbers(connection, bot_id, merged)
                gone = optout.carry_over(connection, before, _opt_out_keys(merged))
                stored = _stored_row(connection, bots.c.id == bot_id)
        except IntegrityError:  # only a new number can collide: a concurrent write took it
            raise self._taken(merged, bot_id) from None
        try:
            optout.carry_over_copies(self._redis, gone, _opt_out_keys(merged))
        except redis_lib.RedisError as error:
            log.warning("bots.opt_out_copy_not_carried_over", bot_id=bot_id, error=str(error))
        self._release_numbers(bot_id, numbers_before - {number for _, number in _numbers_of(merged)})
        self._changed(bot_id, stored)
        return self._bot({**row, "id": bot_id, "engine_token_hash": old.engine_token_hash,
                          "phone_numbers": pool}), shown_once

    def delete(self, bot_id: int) -> bool:
        with transaction(self._engine) as connection:
            deleted = connection.execute(delete(bots).where(bots.c.id == bot_id)).rowcount > 0
            connection.execute(delete(bot_numbers).where(bot_numbers.c.bot_id == bot_id))
            connection.execute(delete(handoffs).where(handoffs.c.bot_id == bot_id))
        if deleted:
            with contextlib.suppress(redis_lib.RedisError):  # a stale copy of a bot that is gone is never read
                self._redis.delete(keys.handoffs(bot_id))
            self._release_numbers(bot_id, None)
            self._changed(bot_id, None)
        return deleted

    def copied(self, route: str) -> Bot | None:
        """The bot `route` leads to, from the registry's copy, not the database. A copy missing
        (flushed) is rebuilt from the database first, by one caller of this process at a time."""
        row, loaded = self.copy.lookup(route)
        if row is None and not loaded:
            self._rebuilds.run(keys.REGISTRY, self._rebuild_unless_loaded)
            row, _ = self.copy.lookup(route)
        return None if row is None else self._bot(row)

    def _rebuild_unless_loaded(self) -> None:
        """Rebuild the copy, unless a rebuild finished since this caller found it missing: a caller
        slow to get here (a busy CPU) would otherwise read the whole registry a second time."""
        if not self.copy.loaded():
            self.copy.rebuild(self._engine)

    def _one(self, condition: Any) -> Bot | None:
        with self._engine.connect() as connection:
            row = _stored_row(connection, condition)
        return None if row is None else self._bot(row)

    # Ownership of numbers and services across the registry.

    def _check_owners(self, connection: Any, fields: Mapping[str, Any], bot_id: int | None) -> None:
        """Refuse a bot without a way to send, a keyword in two of its lists, and any number or
        service SID another bot has."""
        if not fields.get(NUMBER) and not fields.get(SERVICE_SID):
            raise InvalidBot(NUMBER, f"a bot needs a {NUMBER} or a {SERVICE_SID}")
        if fields.get(SHORTEN_URLS) and not fields.get(SERVICE_SID):
            raise InvalidBot(SHORTEN_URLS, f"Twilio shortens links only for messages sent with a {SERVICE_SID}")
        conflict = Keywords.from_stored({k: v for k, v in fields.items() if v is not None}).conflict()
        if conflict is not None:
            raise KeywordConflict(*conflict)
        for field_name, number in _numbers_of(fields):
            owner = _owner(connection, number)
            if owner is None:  # an unlisted number another bot's service sends from answers for that bot
                owner = pool_number_owner(self._redis, number)
            if owner not in (None, bot_id):
                raise NumberTaken(number, owner, field_name)
        service = fields.get(SERVICE_SID)
        if service:
            # SIDs are hex: MG...ABC and MG...abc are one service (and so one bot's).
            owner = connection.execute(select(bots.c.id).where(
                func.lower(bots.c.messaging_service_sid) == service.lower())).scalar()
            if owner not in (None, bot_id):
                raise NumberTaken(service, owner, SERVICE_SID)

    @staticmethod
    def _save_numbers(connection: Any, bot_id: int, fields: Mapping[str, Any]) -> tuple[str, ...]:
        """Make bot_numbers hold exactly the bot's numbers; returns its further ones (phone-numbers)."""
        connection.execute(delete(bot_numbers).where(bot_numbers.c.bot_id == bot_id))
        numbers = [number for _, number in _numbers_of(fields)]
        if numbers:
            connection.execute(insert(connection, bot_numbers), [{"number": n, "bot_id": bot_id} for n in numbers])
        return tuple(number for number in numbers if number != fields.get(NUMBER))

    def _taken(self, fields: Mapping[str, Any], bot_id: int | None) -> Exception:
        """After a unique constraint refused a write: which number (or service) a concurrent write took."""
        try:
            with self._engine.connect() as connection:
                self._check_owners(connection, fields, bot_id)
        except (NumberTaken, InvalidBot) as taken:
            return taken
        return NumberTaken(fields.get(NUMBER) or fields.get(SERVICE_SID) or "")

    def _release_numbers(self, bot_id: int, numbers: set[str] | None) -> None:
        """Numbers the bot no longer has stop answering for its service (shared.poolnumbers)."""
        try:
            poolnumbers.release(self._redis, bot_id, numbers)
        except redis_lib.RedisError as error:
            log.warning("bots.pool_numbers_not_released", bot_id=bot_id, error=str(error))

    def _changed(self, bot_id: int, stored: Mapping[str, Any] | None) -> None:
        """After the commit: the registry's copy gets the bot as committed, then every cache hears of it."""
        try:
            self.copy.put(bot_id, stored)
        except redis_lib.RedisError as error:
            # The change is committed: a copy that missed it is rebuilt from the database when next read.
            log.error("bots.copy_not_written", bot_id=bot_id, error=str(error))
            with contextlib.suppress(redis_lib.RedisError):
                self.copy.forget()
        self._announce(bot_id)

    def _announce(self, bot_id: int) -> None:
        """Every cache drops what it holds, this process's at once."""
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
            "main_phone_number": fields.get(NUMBER),
            "messaging_service_sid": fields.get(SERVICE_SID),
            "engine_url": self._vault.encrypt(fields[ENGINE_URL]) if fields.get(ENGINE_URL) else None,
            "handoff_url": self._vault.encrypt(fields[HANDOFF_URL]) if fields.get(HANDOFF_URL) else None,
            "messages_per_second": float(fields.get(PACE) or DEFAULT_MESSAGES_PER_SECOND),
            "fallback_message": fields.get(FALLBACK),
            # A user field set to null is removed; one named like a secret is kept encrypted.
            "extra": {k: self._sealed(v) if is_secret_name(k) else v for k, v in fields.items()
                      if k not in KNOWN_FIELDS and k not in _INTERNAL and v is not None},
            # None unsets a limit (back to its default).
            "limits": {k: fields[k] for k in SETTING_NAMES if fields.get(k) is not None},
        }

    def _sealed(self, value: Any) -> str:
        """A secret user field's value encrypted (once: a value read back from the row already is)."""
        if isinstance(value, str) and value.startswith(SEALED):
            return value
        return SEALED + self._vault.encrypt(json.dumps(value))

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
            controls=Controls.from_stored(row.get("limits")),
            handoff_url=self._engine_url(row.get("handoff_url")),
            **self._handoff_fields(row.get("handoff_secret_encrypted")),
            messaging_service_sid=row.get("messaging_service_sid"),
            phone_numbers=tuple(row.get("phone_numbers") or ()),
            sending=Sending.from_stored(row.get("limits")),
            keywords=Keywords.from_stored(row.get("limits")),
            hours=Hours.from_stored(row.get("limits")),
        )

    def _handoff_fields(self, encrypted: str | None) -> dict[str, Any]:
        if not encrypted:
            return {}
        secret, previous, until = self._handoff_secrets(encrypted)
        return {"handoff_secret": secret, "handoff_previous_secret": previous, "handoff_previous_until": until}

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
        SERVICE_SID: row.messaging_service_sid,
        ENGINE_URL: row.engine_url, PACE: row.messages_per_second, FALLBACK: row.fallback_message,
    }


def _numbers_of(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A bot's numbers, each with the field that gives it: main-phone-number first, no repeats."""
    given = [(NUMBER, fields[NUMBER])] if fields.get(NUMBER) else []
    given += [(PHONE_NUMBERS, number) for number in fields.get(PHONE_NUMBERS) or ()]
    seen: set[str] = set()
    return [(name, number) for name, number in given if not (number in seen or seen.add(number))]


def _opt_out_keys(fields: Mapping[str, Any]) -> set[str]:
    """Every key a bot's opt-outs are kept under (Bot.opt_out_key): its service, else each of its numbers."""
    return {fields[SERVICE_SID]} if fields.get(SERVICE_SID) else {number for _, number in _numbers_of(fields)}


def _stored_row(connection: Connection, condition: Any) -> dict[str, Any] | None:
    """One bot's row with its phone-numbers: one query (a row per number it has)."""
    rows = connection.execute(select(bots, bot_numbers.c.number.label("pool_number")).outerjoin(
        bot_numbers, bot_numbers.c.bot_id == bots.c.id).where(condition).order_by(bot_numbers.c.number)).all()
    if not rows:
        return None
    main = rows[0].main_phone_number
    pool = tuple(row.pool_number for row in rows if row.pool_number and row.pool_number != main)
    return {**rows[0]._mapping, "phone_numbers": pool}


def _owner(connection: Any, number: str) -> int | None:
    """The bot that has `number`, as its main-phone-number or one of its phone-numbers."""
    main = connection.execute(select(bots.c.id).where(bots.c.main_phone_number == number)).scalar()
    return main if main is not None else connection.execute(
        select(bot_numbers.c.bot_id).where(bot_numbers.c.number == number)).scalar()


def _pools(connection: Any, bot_id: int | None) -> dict[int, tuple[str, ...]]:
    """Each bot's phone-numbers (its numbers besides main-phone-number), sorted; one bot's, or every bot's."""
    query = select(bot_numbers.c.bot_id, bot_numbers.c.number).join(bots, bots.c.id == bot_numbers.c.bot_id).where(
        bot_numbers.c.number != func.coalesce(bots.c.main_phone_number, "")).order_by(bot_numbers.c.number)
    if bot_id is not None:
        query = query.where(bot_numbers.c.bot_id == bot_id)
    pools: dict[int, tuple[str, ...]] = {}
    for owner, number in connection.execute(query):
        pools[owner] = (*pools.get(owner, ()), number)
    return pools


# Every BotCache of this process, so a change made here empties them before the call returns.
_caches: weakref.WeakSet[BotCache] = weakref.WeakSet()


class BotCache:
    """Bots by number (the webhook) and by id (the worker): a short-lived in-process cache over the
    registry's copy in Redis (BotStore.copied), so neither path reads the database.

    One load per key at a time (the others wait for it); a bot asked for near its entry's expiry is
    loaded again by one caller while the others keep the entry; a load that fails (Redis or, for a
    flushed copy, the database unreachable) serves the last bot known. Unknown numbers and ids are
    remembered apart, for less, so a flood of them costs one Redis round trip per number and never
    evicts a bot. Any change announcement empties the cache. Nothing is kept while the listener is
    not subscribed: a change could go unheard.
    """

    def __init__(self, store: BotStore, redis: redis_lib.Redis, ttl: float = CACHE_TTL_SECONDS,
                 negative_ttl: float = NEGATIVE_TTL_SECONDS, limit: int = CACHE_LIMIT,
                 unknown_limit: int = UNKNOWN_LIMIT) -> None:
        self._store = store
        self._redis = redis
        self._ttl, self._negative_ttl = ttl, min(ttl, negative_ttl)
        self._limit, self._unknown_limit = limit, unknown_limit
        # route -> (expires at, bot): bots, and apart from them the routes that lead nowhere.
        self._entries: dict[str, tuple[float, Bot]] = {}
        self._unknown: dict[str, float] = {}
        self._loads = SingleFlight()
        # Bumped by every clear: a lookup that read the copy before a change was announced
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
        return self._lookup(number_route(number))

    def by_id(self, bot_id: int) -> Bot | None:
        return self._lookup(id_route(int(bot_id)))

    def by_service(self, service_sid: str) -> Bot | None:
        """The bot with this Messaging Service SID (inbound messages and status callbacks name it)."""
        return self._lookup(service_route(service_sid))

    def is_bot_number(self, number: str) -> bool:
        """Whether `number` belongs to a bot of this service (whose texts no bot answers: two bots
        would answer each other forever)."""
        return self.by_number(number) is not None

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries, self._unknown = {}, {}

    def _lookup(self, route: str) -> Bot | None:
        self._ensure_listener()
        now = time.monotonic()
        hit = self._entries.get(route)
        if hit is not None and hit[0] > now:
            if hit[0] - now < self._ttl * REFRESH_AHEAD_FRACTION:
                self._loads.start(route, lambda: self._load(route))
            return hit[1]
        if hit is None and self._unknown.get(route, 0.0) > now:
            return None
        try:
            return self._loads.run(route, lambda: self._load(route))
        except (redis_lib.RedisError, SQLAlchemyError) as error:  # the database: rebuilding a flushed copy
            return self._stale(route, hit, error)

    def _stale(self, route: str, hit: tuple[float, Bot] | None, error: Exception) -> Bot:
        """The last bot known for `route` when it cannot be loaded; without one, the error stands."""
        if hit is None:
            raise error
        log.warning("bot_cache.serving_stale", route=route, bot_id=hit[1].id, error=error.__class__.__name__)
        return hit[1]

    def _load(self, route: str) -> Bot | None:
        generation = self._generation
        bot = self._store.copied(route)
        self._remember(route, bot, generation)
        return bot

    def _remember(self, route: str, bot: Bot | None, generation: int) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._subscribed or generation != self._generation:
                return
            if bot is None:
                self._entries.pop(route, None)
                _bounded(self._unknown, route, self._unknown_limit)[route] = now + self._negative_ttl
            else:
                self._unknown.pop(route, None)
                _bounded(self._entries, route, self._limit)[route] = (now + self._ttl, bot)

    def _set_subscribed(self, subscribed: bool) -> None:
        with self._lock:
            self._subscribed = subscribed
            self._generation += 1
            self._entries, self._unknown = {}, {}

    def _ensure_listener(self) -> None:
        if self._listener is not None:
            return
        with self._lock:
            if self._listener is None:
                self._listener = threading.Thread(target=_listen, args=(weakref.ref(self), self._redis),
                                                  name="bot-cache-invalidation", daemon=True)
                self._listener.start()


def _bounded(entries: dict[str, Any], route: str, limit: int) -> dict[str, Any]:
    """`entries`, with room for `route`: past `limit`, the oldest goes (entries expire in about that order)."""
    if route not in entries and len(entries) >= limit:
        del entries[next(iter(entries))]
    return entries


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
            cache = cache_ref()
            if cache is None:
                return  # the cache is gone: nothing to keep fresh, and nobody to tell
            cache._set_subscribed(False)
            del cache
            log.warning("bot_cache.listener_reconnecting")
            time.sleep(1)
        finally:
            pubsub.close()
