"""Opt-out keywords and the per-bot-number record of who opted out (the webhook's accept script
records STOP and START itself, in the same step that queues the message)."""

from __future__ import annotations

from typing import Any

from shared import keys

OPT_OUT_KEYWORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"})
OPT_IN_KEYWORDS = frozenset({"START", "YES", "UNSTOP"})

MESSAGE, OPT_OUT, OPT_IN = "message", "opt_out", "opt_in"


def classify(body: str | None, opt_out_type: str | None = None) -> str:
    """The engine event an inbound text stands for: Twilio's OptOutType wins, else the whole body."""
    kind = (opt_out_type or "").strip().upper()
    if kind == "STOP":
        return OPT_OUT
    if kind == "START":
        return OPT_IN
    word = (body or "").strip().upper()
    if word in OPT_OUT_KEYWORDS:
        return OPT_OUT
    if word in OPT_IN_KEYWORDS:
        return OPT_IN
    return MESSAGE


def is_opted_out(redis: Any, bot_number: str, recipient: str) -> bool:
    return bool(redis.sismember(keys.opted_out(bot_number), recipient))


def opt_out(redis: Any, bot_number: str, recipient: str) -> None:
    redis.sadd(keys.opted_out(bot_number), recipient)

