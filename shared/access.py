"""Who may do what: an admin reaches every bot and every action; an operator only its bots'
conversations (read, send, pause and resume, dead letters), and nothing that changes a bot or the
service. The same rules serve the REST API's keys (shared.apikeys) and the console's people.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ADMIN, OPERATOR = "admin", "operator"
ROLES = (ADMIN, OPERATOR)

# What an operator may do, to a bot in its scope; everything else (bot settings, bot creation,
# erasure, /metrics, key management) is an admin's.
READ_CONVERSATIONS = "read-conversations"
SEND = "send"
HANDOFF = "handoff"
DEAD_LETTERS = "dead-letters"
READ_BOTS = "read-bots"
OPERATOR_ACTIONS = frozenset({READ_CONVERSATIONS, SEND, HANDOFF, DEAD_LETTERS, READ_BOTS})


@dataclass(frozen=True)
class Principal:
    """Whoever a request speaks for. `bots` empty: every bot of the app."""

    role: str
    bots: frozenset[int]
    name: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def may(self, action: str | None, bot_id: int | None = None) -> bool:
        """Whether this principal may take `action` (None: an admin's action) on `bot_id` (None: no bot)."""
        if self.is_admin:
            return True
        if action not in OPERATOR_ACTIONS:
            return False
        return bot_id is None or self.reaches(bot_id)

    def reaches(self, bot_id: int) -> bool:
        return self.is_admin or not self.bots or bot_id in self.bots

    def visible(self, bot_ids: Iterable[int]) -> list[int]:
        return [bot_id for bot_id in bot_ids if self.reaches(bot_id)]


ADMIN_TOKEN = Principal(ADMIN, frozenset(), "ADMIN_API_TOKEN")
