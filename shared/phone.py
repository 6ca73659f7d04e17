"""Phone numbers: E.164 normalisation, the sender shapes Twilio delivers, and masking for logs."""

from __future__ import annotations

import re

# ASCII spaces only: Python's \s and a JSON Schema pattern's \s differ beyond them.
_SEPARATOR = r"[ \t\n\r\f\v\-().]"
_SEPARATORS = re.compile(_SEPARATOR)
# [0-9], not \d: in Python \d also matches fullwidth and Arabic-Indic digits, which no carrier routes
# and which would let one number be registered twice under two spellings.
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
# What normalize_e164 accepts, as one regular expression (the API's description states it).
E164_PATTERN = rf"^{_SEPARATOR}*\+{_SEPARATOR}*[1-9](?:{_SEPARATOR}*[0-9]){{6,14}}{_SEPARATOR}*$"
# What Twilio puts in an inbound From besides E.164: a short code, or an alphanumeric sender id.
_SHORT_CODE = re.compile(r"[0-9]{3,8}")
_ALPHANUMERIC_ID = re.compile(r"(?=[0-9 ]*[A-Za-z])[A-Za-z0-9 ]{1,11}")


class InvalidNumber(ValueError):
    pass


def normalize_e164(value: object) -> str:
    """`value` as E.164 ('+' and 7 to 15 ASCII digits, the first not 0), after stripping separators."""
    if not isinstance(value, str):
        raise InvalidNumber("must be a phone number in E.164 format, e.g. +11234567890")
    number = _SEPARATORS.sub("", value)
    if not _E164.fullmatch(number):
        raise InvalidNumber(f"{value!r} is not a phone number in E.164 format, e.g. +11234567890")
    return number


def is_e164(value: object) -> bool:
    """The shape of E.164, not carrier validity: Twilio's test numbers (+15005550006) pass."""
    return isinstance(value, str) and _E164.fullmatch(value) is not None


def is_sender(value: object) -> bool:
    """Whether an inbound From is one Twilio could deliver: E.164, a short code or an alphanumeric id."""
    return isinstance(value, str) and (
        is_e164(value) or _SHORT_CODE.fullmatch(value) is not None or _ALPHANUMERIC_ID.fullmatch(value) is not None)


def mask(number: str | None, full: bool = False) -> str | None:
    """Keep the last four digits: enough to tell conversations apart in logs, not to identify a person."""
    if number is None or full:
        return number
    return "*" * max(len(number) - 4, 0) + number[-4:]
