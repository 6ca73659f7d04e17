"""Retention: log rows, dead letters and ended handoffs older than LOG_RETENTION_DAYS are deleted,
a batch at a time. A handoff still in force (`until` in the future, or none: until resumed) is
the conversation's present state, and is kept.

Each batch is its own short transaction, so a large purge never holds locks on the tables for long
and the workers' writes go on between batches. Opt-outs are never purged: they are the law's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import Column, Engine, Table, delete, select, tuple_

from shared.schema import conversations, dead_letters, deliveries, handoffs, messages

BATCH = 2_000
DAY_SECONDS = 86_400.0

# Each table with the column that says how old a row is, and the column that names a row.
PURGED: tuple[tuple[Table, Column[float], tuple[Column[object], ...]], ...] = (
    (messages, messages.c.at, (messages.c.id,)),
    (deliveries, deliveries.c.updated_at, (deliveries.c.sid,)),
    (conversations, conversations.c.last_at, (conversations.c.bot_id, conversations.c.person)),
    (dead_letters, dead_letters.c.failed_at, (dead_letters.c.id,)),
    (handoffs, handoffs.c.until, (handoffs.c.bot_id, handoffs.c.person)),  # a null `until` is never older
)


@dataclass
class Purged:
    """Rows deleted per table, and how many batches that took."""

    rows: dict[str, int] = field(default_factory=dict)
    batches: int = 0

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def purge(engine: Engine, days: int, now: float | None = None, batch: int = BATCH) -> Purged:
    """Delete every row older than `days`, in batches of at most `batch` rows per transaction."""
    cutoff = (time.time() if now is None else now) - days * DAY_SECONDS
    purged = Purged()
    for table, age, key in PURGED:
        purged.rows[table.name] = 0
        while True:
            deleted = _delete_batch(engine, table, age, key, cutoff, batch)
            purged.batches += 1
            purged.rows[table.name] += deleted
            if deleted < batch:
                break
    return purged


def _delete_batch(engine: Engine, table: Table, age: Column[float], key: tuple[Column[object], ...],
                  cutoff: float, batch: int) -> int:
    oldest = select(*key).where(age < cutoff).limit(batch)
    named = key[0] if len(key) == 1 else tuple_(*key)
    with engine.begin() as connection:
        result = connection.execute(delete(table).where(named.in_(oldest)))
        return int(result.rowcount or 0)
