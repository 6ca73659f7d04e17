"""The system of record's tables: what an operator, a person or the law needs later.

Redis holds only work in flight; everything here survives a Redis flush. Times are Unix seconds
(UTC) as floats, the same values the API and the logs show. Changes to these tables go through an
Alembic revision in shared/migrations/versions (`alembic revision --autogenerate -m "..."`).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON, Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text, text,
)

# Named constraints, so migrations can refer to them on every database.
metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
})

# Twilio's statuses, in the order a message moves through them; a status never moves backwards.
STATUSES = ("accepted", "scheduled", "queued", "sending", "sent", "failed", "undelivered", "delivered", "read",
            "canceled")

bots = Table(
    "bots", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("account_sid", String(64), nullable=False),
    Column("auth_token_encrypted", Text, nullable=False),  # Fernet, under CREDENTIALS_KEY
    Column("main_phone_number", String(20), unique=True),  # null: the bot sends only through its messaging service
    Column("engine_url", Text),
    Column("messages_per_second", Float, nullable=False),
    Column("fallback_message", Text),
    Column("extra", JSON, nullable=False),  # the other user fields, as given
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # Only the limits an operator set; the others take the release's defaults (shared.bots.Limits).
    Column("limits", JSON, nullable=False, server_default=text("'{}'")),
    Column("engine_token_hash", String(64)),  # SHA-256 of the bot's engine token; null: none issued
    Column("handoff_url", Text),  # encrypted like engine_url; a paused conversation's messages go there
    Column("handoff_secret_encrypted", Text),  # the HMAC key of those forwards, under CREDENTIALS_KEY
    # The bot's Twilio Messaging Service, if any (it sends through it; any of its pool's numbers reaches the bot).
    Column("messaging_service_sid", String(34), unique=True),
    sqlite_autoincrement=True,  # a deleted bot's id is never given to a new one (its log keeps the id)
)

# Every number of every bot (its main-phone-number and its phone-numbers), so that no number ever
# belongs to two bots: the primary key says so even to concurrent writes.
bot_numbers = Table(
    "bot_numbers", metadata,
    Column("number", String(20), primary_key=True),
    Column("bot_id", Integer, nullable=False),
    Index(None, "bot_id"),
)

# The latest opt-out state of one person towards one bot number, with when and how it changed.
opt_outs = Table(
    "opt_outs", metadata,
    # A sender number, or a Messaging Service SID for a send whose number Twilio picked.
    Column("bot_number", String(40), primary_key=True),
    Column("person", String(32), primary_key=True),
    Column("opted_out", Boolean, nullable=False),
    Column("how", String(64), nullable=False),  # "keyword STOP", "OptOutType STOP", "error 21610", ...
    Column("at", Float, nullable=False),
)

# Every inbound and outbound message. An inbound's id is its MessageSid; a reply's is its reply id,
# and its Twilio MessageSid (`sid`) is filled in once Twilio accepts it.
messages = Table(
    "messages", metadata,
    Column("id", String(64), primary_key=True),
    Column("bot_id", Integer, nullable=False),
    Column("person", String(32), nullable=False),
    Column("bot_number", String(20)),
    Column("direction", String(3), nullable=False),  # "in" or "out"
    Column("origin", String(16), nullable=False),  # "person", "engine", "callback", "replay"
    Column("text", Text, nullable=False),
    Column("media", JSON, nullable=False),
    Column("sid", String(64), unique=True),
    Column("in_reply_to", String(64)),
    Column("status", String(16), nullable=False),  # received, pending, queued, suppressed, failed
    Column("error_code", Integer),
    Column("at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index(None, "bot_id", "person", "at"),
    Index(None, "at"),
)

# What Twilio's status callbacks said of each sent message, keyed by its MessageSid: kept apart
# from `messages` so a callback that overtakes the worker's own write is recorded all the same.
deliveries = Table(
    "deliveries", metadata,
    Column("sid", String(64), primary_key=True),
    Column("bot_id", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("error_code", Integer),
    Column("updated_at", Float, nullable=False),
    *(Column(f"{status}_at", Float) for status in STATUSES),
    Index(None, "updated_at"),
)

# The people each bot has talked to, with their latest message: the conversation list's index.
conversations = Table(
    "conversations", metadata,
    Column("bot_id", Integer, primary_key=True),
    Column("person", String(32), primary_key=True),
    Column("last_message_id", String(64), nullable=False),
    Column("last_at", Float, nullable=False),
    Index(None, "bot_id", "last_at"),
    Index(None, "last_at"),
)

# Conversations a human has taken over (human handoff): the bot's engine is not asked while
# `until` (null: until resumed) is in the future. `by`: "operator" or "engine"; `message_sid`: the
# inbound whose answer asked for it (an engine's handoff), so that message is answered if handled again.
handoffs = Table(
    "handoffs", metadata,
    Column("bot_id", Integer, primary_key=True),
    Column("person", String(32), primary_key=True),
    Column("since", Float, nullable=False),
    Column("until", Float),
    Column("by", String(16), nullable=False),
    Column("note", Text),
    Column("message_sid", String(64)),
)

# Replies that failed for good, with what `mammut-sms dlq list` shows and `dlq replay` needs.
dead_letters = Table(
    "dead_letters", metadata,
    Column("id", String(64), primary_key=True),  # the reply's id
    Column("bot_id", Integer, nullable=False),
    Column("person", String(32), nullable=False),
    Column("text", Text, nullable=False),
    Column("media_url", Text),
    Column("error_code", Integer),
    Column("http_status", Integer),
    Column("error", Text),
    Column("reason", String(16), nullable=False),  # permanent, exhausted, unexpected
    Column("attempts", Integer, nullable=False),
    Column("failed_at", Float, nullable=False),
    Index(None, "failed_at"),
)

# Messages to send later (shared.schedule): an operator's or an engine's with a send_at, and those
# held through the recipient's quiet hours. `seq` orders those due at the same moment as they came.
scheduled = Table(
    "scheduled", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False, unique=True),
    Column("bot_id", Integer, nullable=False),
    Column("person", String(32), nullable=False),
    Column("text", Text, nullable=False),
    Column("media_url", Text),
    Column("origin", String(16), nullable=False),  # operator or callback (messagelog's origins)
    Column("reason", String(16), nullable=False),  # send-at (asked for a time) or quiet-hours (held)
    Column("send_at", Float, nullable=False),  # when it is due (for a held one, when the quiet hours end)
    Column("state", String(16), nullable=False),  # shared.schedule.STATES
    Column("created_at", Float, nullable=False),
    Column("done_at", Float),
    Index(None, "state", "send_at"),
    Index(None, "bot_id", "send_at"),
)

# Keys for the REST API scoped to a role and some bots (shared.access); the key itself is shown once
# and kept only as its SHA-256. Deleting the row revokes the key.
api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("role", String(16), nullable=False),  # "admin" or "operator"
    Column("bots", JSON, nullable=False),  # bot ids; empty: every bot of the app
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
)

# People who sign in to the console (/console/), with the same roles and scopes as the API keys.
operators = Table(
    "operators", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("email", String(320), nullable=False, unique=True),  # stored lower-cased
    Column("role", String(16), nullable=False),
    Column("bots", JSON, nullable=False),
    Column("password_hash", Text, nullable=False),  # argon2id, with its own salt and parameters
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
