"""REST API keys scoped to a role and some bots: made, listed, revoked, and looked up by the key.

A key is 32 random bytes shown once; only its SHA-256 is kept (it is random, so a slow hash adds
nothing), and every request looks it up, so a revoked key stops working with the next request.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from shared.access import Principal
from shared.bots import token_hash
from shared.schema import api_keys

PREFIX = "msk_"


def create(connection: Connection, name: str, role: str, bots: list[int]) -> tuple[int, str]:
    """The new key's id, and the key (this is the one time it is known)."""
    key = PREFIX + secrets.token_urlsafe(32)
    result = connection.execute(insert(api_keys).values(
        name=name, role=role, bots=sorted(set(bots)), key_hash=token_hash(key), created_at=time.time()))
    return int(result.inserted_primary_key[0]), key


def list_all(connection: Connection) -> list[dict[str, Any]]:
    rows = connection.execute(select(api_keys.c.id, api_keys.c.name, api_keys.c.role, api_keys.c.bots,
                                     api_keys.c.created_at).order_by(api_keys.c.id))
    return [{"id": row.id, "name": row.name, "role": row.role, "bots": list(row.bots), "created-at": row.created_at}
            for row in rows]


def revoke(connection: Connection, key_id: int) -> bool:
    return connection.execute(delete(api_keys).where(api_keys.c.id == key_id)).rowcount == 1


def principal(connection: Connection, key: str) -> Principal | None:
    """Whom `key` speaks for, or None for no such key (revoked, or never made)."""
    if not key.startswith(PREFIX):
        return None
    row = connection.execute(select(api_keys.c.id, api_keys.c.name, api_keys.c.role, api_keys.c.bots)
                             .where(api_keys.c.key_hash == token_hash(key))).first()
    if row is None:
        return None
    return Principal(row.role, frozenset(row.bots), f"key {row.id} ({row.name})")
