"""Console operators: people who sign in at /console/, each with a role and the bots they may reach
(shared.access). Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's low-memory
profile), each with its own salt; an account that does not exist costs a sign-in the same hash.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, delete, insert, select, update

from shared.access import Principal
from shared.schema import operators

MIN_PASSWORD = 12
MAX_PASSWORD = 1024  # argon2 takes any length; a megabyte "password" should not cost a hash
_HASHER = PasswordHasher()


@functools.cache
def _decoy() -> str:
    """Verified when no account has the email, so a sign-in takes as long either way."""
    return _HASHER.hash("no such operator, and this is no password")


class InvalidOperator(ValueError):
    """An email, role or password that cannot be kept; the message says why."""


@dataclass(frozen=True)
class Operator:
    id: int
    email: str
    role: str
    bots: tuple[int, ...]

    def principal(self) -> Principal:
        return Principal(self.role, frozenset(self.bots), self.email)


def normalized_email(email: str) -> str:
    email = email.strip().lower()
    local, at, domain = email.partition("@")
    if not (local and at and "." in domain) or len(email) > 320 or any(c.isspace() for c in email):
        raise InvalidOperator(f"{email!r} is not an email address")
    return email


def password_problem(password: str) -> str | None:
    if len(password) < MIN_PASSWORD:
        return f"a password needs at least {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"a password has at most {MAX_PASSWORD} characters"
    return None


def _hashed(password: str) -> str:
    if problem := password_problem(password):
        raise InvalidOperator(problem)
    return _HASHER.hash(password)


def add(connection: Connection, email: str, role: str, bots: list[int], password: str) -> Operator:
    now = time.time()
    email = normalized_email(email)
    if by_email(connection, email) is not None:
        raise InvalidOperator(f"{email} already has an account (reset-password changes its password)")
    result = connection.execute(insert(operators).values(email=email, role=role, bots=sorted(set(bots)),
                                                         password_hash=_hashed(password), created_at=now,
                                                         updated_at=now))
    return Operator(int(result.inserted_primary_key[0]), email, role, tuple(sorted(set(bots))))


def list_all(connection: Connection) -> list[Operator]:
    return [_operator(row) for row in connection.execute(select(operators).order_by(operators.c.email))]


def by_email(connection: Connection, email: str) -> Operator | None:
    row = connection.execute(select(operators).where(operators.c.email == email.strip().lower())).first()
    return _operator(row) if row else None


def by_id(connection: Connection, operator_id: int) -> Operator | None:
    row = connection.execute(select(operators).where(operators.c.id == operator_id)).first()
    return _operator(row) if row else None


def remove(connection: Connection, email: str) -> Operator | None:
    found = by_email(connection, email)
    if found is not None:
        connection.execute(delete(operators).where(operators.c.id == found.id))
    return found


def set_password(connection: Connection, email: str, password: str) -> Operator | None:
    found = by_email(connection, email)
    if found is not None:
        connection.execute(update(operators).where(operators.c.id == found.id)
                           .values(password_hash=_hashed(password), updated_at=time.time()))
    return found


def authenticate(connection: Connection, email: str, password: str) -> Operator | None:
    """The operator whose email and password these are, else None (after the same work)."""
    row = connection.execute(select(operators).where(operators.c.email == email.strip().lower())).first()
    stored = row.password_hash if row else _decoy()
    try:
        _HASHER.verify(stored, password[:MAX_PASSWORD + 1])
    except (VerificationError, InvalidHashError):
        return None
    if row is None:
        return None
    if _HASHER.check_needs_rehash(stored):  # argon2-cffi's parameters grew since: keep the stronger hash
        connection.execute(update(operators).where(operators.c.id == row.id)
                           .values(password_hash=_HASHER.hash(password)))
    return _operator(row)


def _operator(row: object) -> Operator:
    return Operator(row.id, row.email, row.role, tuple(row.bots))  # type: ignore[attr-defined]
