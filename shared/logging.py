"""structlog, configured once for both processes: JSON lines in production, console in development."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

from shared import jsonio
from shared.phone import mask
from shared.settings import Settings

# Event fields that hold phone numbers: masked unless LOG_PHONE_NUMBERS=full.
PHONE_FIELDS = frozenset({"from_", "to", "sender", "recipient", "number", "bot_number"})
# Fields that must never reach a log line, whatever a caller passes.
SECRET_FIELDS = frozenset({"auth_token", "twilio_auth_token", "twilio-auth-token", "password", "authorization"})


# Any other field whose name says it holds a secret (api_token, client_secret, credentials_key, ...).
_SECRET_NAME = re.compile(r"token|secret|password|passwd|authorization|credential|api[-_]?key", re.IGNORECASE)
# Not secrets, though their names say "token": Twilio's retry token only identifies a webhook delivery.
_NOT_SECRET = frozenset({"idempotency_token"})
# A phone number inside free text: a conversation id ("3:+15551234567"), a URL, an error message.
_E164_IN_TEXT = re.compile(r"\+[1-9]\d{7,14}")
# user:password@ in a URL (REDIS_URL of Heroku Redis carries its password that way).
_URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^/\s:@]*:)[^/\s@]+@", re.IGNORECASE)
# A URL's query values (an engine URL may carry ?token=...): logged as name=***.
_URL_QUERY_VALUE = re.compile(r"([?&][^=&#\s]+=)[^&#\s]+")
REDACTED = "[redacted]"
# Request fields reach log lines as the caller sent them: a 60 KB MessageSid must not become 60 KB of log.
MAX_FIELD_CHARS = 200
# A traceback is ours and needed whole, but its message may quote a request field.
MAX_TRACEBACK_CHARS = 10_000
_CHATTY_LIBRARIES = ("twilio", "urllib3")


# The same, judged on the name's letters alone: accessToken, private_key, TOKEN1, pwd, bearer, auth.
_SECRET_LETTERS = re.compile(r"token|secret|passw|passwd|pwd|credential|bearer|apikey|privatekey|authorization|auth$")
# A URL path segment that looks like a key (Slack's /services/T0123/B0456/<24 characters>): 16 or more
# characters mixing letters and digits. Ids as short as Twilio's or Slack's T.../B... stay readable.
_SECRET_SEGMENT = re.compile(
    r"(?<=/)(?=[A-Za-z0-9_\-]*?[0-9])(?=[A-Za-z0-9_\-]*?[A-Za-z])[A-Za-z0-9_\-]{16,}(?![A-Za-z0-9_\-])")


def is_secret_name(name: str) -> bool:
    """Whether a field's name says it holds a secret (log fields, a bot's extra user fields)."""
    if name in SECRET_FIELDS:
        return True
    if name in _NOT_SECRET:
        return False
    return _SECRET_NAME.search(name) is not None or _SECRET_LETTERS.search(re.sub(r"[^a-z]", "", name.lower())) is not None


def redact_path(text: str) -> str:
    """`text` with every key-like URL path segment replaced by [redacted]."""
    return _SECRET_SEGMENT.sub(REDACTED, text) if "/" in text else text


_is_secret = is_secret_name


def _scrub(full_numbers: bool, secrets: tuple[str, ...] = ()) -> structlog.types.Processor:
    """Redact secrets (by field name, in URLs, and the known secret values), mask phone numbers,
    and cap every string field (and the strings in a list) at its length, in one pass.

    It runs for every event of the webhook's hot path, so each check is skipped when a cheap test
    shows it cannot match: a field name is judged once, and a text without "://" holds no URL
    credentials, one without "+" no E.164 number. Capping comes after redacting, so a secret is
    redacted whole rather than cut into a prefix it no longer matches.
    """
    # What each field name is: SECRET (redacted whatever its value), PHONE (masked) or the length
    # its text is capped at; judged the first time the name is met.
    kinds: dict[str, int] = {}

    def kind_of(key: str) -> int:
        if _is_secret(key):
            kind = _SECRET
        elif key in PHONE_FIELDS and not full_numbers:
            kind = _PHONE
        else:
            kind = MAX_TRACEBACK_CHARS if key == "exception" else MAX_FIELD_CHARS
        kinds[key] = kind
        return kind

    def clean(text: str) -> str:
        if "://" in text:
            text = _URL_CREDENTIALS.sub(lambda m: m[1] + REDACTED + "@", text)
            text = _URL_QUERY_VALUE.sub(lambda m: m[1] + REDACTED, text)
        if "/" in text:  # a URL, or an HTTP library's error quoting only its path ("with url: /services/...")
            text = redact_path(text)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if not full_numbers and "+" in text:
            text = _E164_IN_TEXT.sub(lambda m: mask(m[0]) or "", text)
        return text

    def scrub(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in event.items():
            kind = kinds.get(key) or kind_of(key)
            if kind == _SECRET:
                event[key] = REDACTED
            elif isinstance(value, str):
                text = (mask(value) or "") if kind == _PHONE else clean(value)
                event[key] = text if len(text) <= MAX_FIELD_CHARS else _cut(text, max(kind, MAX_FIELD_CHARS))
            elif isinstance(value, (list, tuple)):
                limit = max(kind, MAX_FIELD_CHARS)
                event[key] = [_cut(clean(item), limit) if isinstance(item, str) else item for item in value]
        return event

    return scrub


# Field kinds of _scrub besides a length (both below any length a field is capped at).
_SECRET, _PHONE = -1, -2


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…[+{len(text) - limit} chars]"


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level)
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=False) if settings.development
        else structlog.processors.JSONRenderer(serializer=jsonio.log_line)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # After format_exc_info, so a traceback's text is scrubbed like any other field.
            structlog.processors.format_exc_info,
            _scrub(settings.log_phone_numbers == "full", _known_secrets(settings)),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        # Caching is for speed in production; uncached loggers let tests capture events (capture_logs).
        cache_logger_on_first_use=not settings.development,
    )
    # Libraries log through the standard library; keep them at WARNING so logs stay one event per hop.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    # dramatiq's CLI sets up the root logger at INFO before we run, so basicConfig above is a no-op
    # there: name the chatty ones (twilio logs every request's URL and headers at INFO).
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def _known_secrets(settings: Settings) -> tuple[str, ...]:
    """This process's own secrets, redacted wherever they appear (an error message quoting a header, say)."""
    candidates = (settings.admin_api_token, *settings.credentials_keys)
    # Very short values would redact innocent text; the service's real secrets are long.
    return tuple(secret for secret in candidates if secret and len(secret) >= 8)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
