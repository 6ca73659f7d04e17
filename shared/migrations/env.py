"""Alembic's entry point: migrates the database named by the caller (`mammut-sms migrate`), else DATABASE_URL."""

from __future__ import annotations

from alembic import context

from shared.db import make_engine
from shared.schema import metadata
from shared.settings import Settings

config = context.config
url = config.attributes.get("url") or Settings.from_env().database_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url, size=1)
    try:
        with engine.connect() as connection:
            # render_as_batch: SQLite alters a table by copying it, which batch mode does for us.
            context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
