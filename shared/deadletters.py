"""Dead letters: replies that failed for good (refused for good, or out of retries), kept in the
database until an operator replays them (shared.dlq lists and replays them)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, delete, select

from shared.db import insert
from shared.schema import dead_letters

COLUMNS = tuple(column.name for column in dead_letters.columns)


def record(connection: Connection, letter: dict[str, Any]) -> None:
    """Keep a dead reply (the columns of `dead_letters`, id being the reply's id); the same reply
    failing again (a crash before its outbox moved on) keeps the latest failure."""
    row = {name: letter.get(name) for name in COLUMNS}
    statement = insert(connection, dead_letters).values(**row)
    connection.execute(statement.on_conflict_do_update(
        index_elements=[dead_letters.c.id],
        set_={name: statement.excluded[name] for name in COLUMNS if name != "id"},
    ))


def list_all(connection: Connection) -> list[dict[str, Any]]:
    """Every dead letter, oldest first."""
    rows = connection.execute(select(dead_letters).order_by(dead_letters.c.failed_at, dead_letters.c.id))
    return [dict(row._mapping) for row in rows]


def take(connection: Connection, reply_id: str) -> bool:
    """Remove a dead letter; False when it is gone already (replayed by someone else meanwhile)."""
    return connection.execute(delete(dead_letters).where(dead_letters.c.id == reply_id)).rowcount == 1
