"""The console's sessions, kept in Redis: the browser holds a random token, Redis holds (under the
token's SHA-256) whose session it is and its CSRF token. Signing out deletes every session of the
operator, so it ends the session everywhere; so does a new password or a removed account.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import redis as redis_lib

from shared import keys
from shared.bots import token_hash

SESSION_SECONDS = 12 * 3600  # a working day; then sign in again
SIGN_IN_WINDOW_SECONDS = 15 * 60
MAX_FAILURES_PER_ACCOUNT = 5
MAX_FAILURES_PER_ADDRESS = 20


@dataclass(frozen=True)
class Session:
    operator_id: int
    csrf: str


def start(redis: redis_lib.Redis, operator_id: int) -> str:
    """A new session for the operator; returns the token its cookie carries."""
    token = secrets.token_urlsafe(32)
    hashed = token_hash(token)
    pipe = redis.pipeline()
    pipe.hset(keys.console_session(hashed), mapping={"operator": operator_id, "csrf": secrets.token_urlsafe(32),
                                                      "at": time.time()})
    pipe.expire(keys.console_session(hashed), SESSION_SECONDS)
    pipe.sadd(keys.console_sessions_of(operator_id), hashed)
    pipe.expire(keys.console_sessions_of(operator_id), SESSION_SECONDS)
    pipe.execute()
    return token


def find(redis: redis_lib.Redis, token: str) -> Session | None:
    if not token:
        return None
    stored = redis.hgetall(keys.console_session(token_hash(token)))
    if not stored:
        return None
    return Session(int(stored["operator"]), stored["csrf"])


def end_all(redis: redis_lib.Redis, operator_id: int) -> int:
    """End every session of the operator; returns how many there were."""
    hashes = redis.smembers(keys.console_sessions_of(operator_id))
    pipe = redis.pipeline()
    for hashed in hashes:
        pipe.delete(keys.console_session(hashed))
    pipe.delete(keys.console_sessions_of(operator_id))
    pipe.execute()
    return len(hashes)


def sign_in_blocked(redis: redis_lib.Redis, account: str, address: str) -> bool:
    """Whether too many sign-ins failed lately for this account or from this address."""
    account_failures, address_failures = redis.mget(keys.console_sign_in_failures("account", account),
                                                    keys.console_sign_in_failures("address", address))
    return (int(account_failures or 0) >= MAX_FAILURES_PER_ACCOUNT
            or int(address_failures or 0) >= MAX_FAILURES_PER_ADDRESS)


def sign_in_failed(redis: redis_lib.Redis, account: str, address: str) -> None:
    pipe = redis.pipeline()
    for key in (keys.console_sign_in_failures("account", account), keys.console_sign_in_failures("address", address)):
        pipe.incr(key)
        pipe.expire(key, SIGN_IN_WINDOW_SECONDS, nx=True)
    pipe.execute()


def sign_in_succeeded(redis: redis_lib.Redis, account: str) -> None:
    redis.delete(keys.console_sign_in_failures("account", account))
