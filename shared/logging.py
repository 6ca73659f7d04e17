"""structlog, configured once for both processes: JSON lines in production, console in development."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from shared.phone import mask
from shared.settings import Settings

# Event fields that hold phone numbers: masked unless LOG_PHONE_NUMBERS=full.
PHONE_FIELDS = frozenset({"from_", "to", "sender", "recipient", "number", "bot_number"})
# Fields that must never reach a log line, whatever a caller passes.
SECRET_FIELDS = frozenset({"auth_token", "twilio_auth_token", "twilio-auth-token", "password", "authorization"})


def _scrub(full_numbers: bool) -> structlog.types.Processor:
    def scrub(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        for key in SECRET_FIELDS & event.keys():
            event[key] = "[redacted]"
        if not full_numbers:
            for key in PHONE_FIELDS & event.keys():
                if isinstance(event[key], str):
                    event[key] = mask(event[key])
        return event

    return scrub


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level)
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=False) if settings.development else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _scrub(settings.log_phone_numbers == "full"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        # Caching is for speed in production; uncached loggers let tests capture events (capture_logs).
        cache_logger_on_first_use=not settings.development,
    )
    # Libraries log through the standard library; keep them at WARNING so logs stay one event per hop.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
