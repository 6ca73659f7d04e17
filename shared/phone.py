"""Phone numbers: E.164 normalisation and masking for logs."""

from __future__ import annotations

import re

_SEPARATORS = re.compile(r"[\s\-().]")
_E164 = re.compile(r"\+[1-9]\d{7,14}")


class InvalidNumber(ValueError):
    pass


def normalize_e164(value: object) -> str:
    """`value` as E.164 ('+', a non-zero digit, 7 to 14 more digits), after stripping separators."""
    if not isinstance(value, str):
        raise InvalidNumber("must be a phone number in E.164 format, e.g. +11234567890")
    number = _SEPARATORS.sub("", value)
    if not _E164.fullmatch(number):
        raise InvalidNumber(f"{value!r} is not a phone number in E.164 format, e.g. +11234567890")
    return number


def is_e164(value: object) -> bool:
    return isinstance(value, str) and _E164.fullmatch(value) is not None


def mask(number: str | None, full: bool = False) -> str | None:
    """Keep the last four digits: enough to tell conversations apart in logs, not to identify a person."""
    if number is None or full:
        return number
    return "*" * max(len(number) - 4, 0) + number[-4:]
