"""The worker process's resources, each reached through one accessor."""

from __future__ import annotations

from functools import lru_cache

import redis as redis_lib
from sqlalchemy import Engine

from shared.bots import BotCache, BotStore
from shared.crypto import Vault
from shared.db import get_engine as shared_engine
from shared.redis import get_redis as shared_redis
from shared.settings import Settings, get_settings as shared_settings


def get_settings() -> Settings:
    return shared_settings().checked()


def get_redis() -> redis_lib.Redis:
    return shared_redis(get_settings().redis_url)


def get_engine() -> Engine:
    return shared_engine(get_settings())


@lru_cache(maxsize=1)
def get_store() -> BotStore:
    return BotStore(get_engine(), get_redis(), Vault(get_settings().credentials_keys))


@lru_cache(maxsize=1)
def get_bots() -> BotCache:
    """The process's bots by id, cached: the worker reads a bot for every message and reply."""
    return BotCache(get_store(), get_redis())
