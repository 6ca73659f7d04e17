"""The web process's resources, each reached through one accessor."""

from __future__ import annotations

from dataclasses import dataclass

import dramatiq
import redis as redis_lib
from flask import Flask, current_app
from sqlalchemy import Engine

from shared.bots import BotCache, BotStore
from shared.crypto import Vault
from shared.db import check_schema, get_engine as shared_engine
from shared.redis import get_redis as shared_redis
from shared.settings import Settings
from shared.tasks import make_broker


@dataclass
class Resources:
    settings: Settings
    redis: redis_lib.Redis
    engine: Engine
    store: BotStore
    bots: BotCache
    broker: dramatiq.Broker


def init_app(app: Flask, settings: Settings) -> None:
    engine = shared_engine(settings)
    check_schema(engine)  # a release whose migrations did not run stops here, saying what to run
    redis = shared_redis(settings.redis_url)
    store = BotStore(engine, redis, Vault(settings.credentials_keys))
    app.extensions["mammut"] = Resources(
        settings=settings, redis=redis, engine=engine, store=store, bots=BotCache(store, redis), broker=make_broker(settings.redis_url),
    )


def resources() -> Resources:
    return current_app.extensions["mammut"]


def get_settings() -> Settings:
    return resources().settings


def get_redis() -> redis_lib.Redis:
    return resources().redis


def get_engine() -> Engine:
    return resources().engine


def get_store() -> BotStore:
    return resources().store


def get_bots() -> BotCache:
    return resources().bots


def get_broker() -> dramatiq.Broker:
    return resources().broker
