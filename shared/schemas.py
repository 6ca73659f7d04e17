"""Payloads of the bot registry API, as marshmallow schemas (also the source of /openapi.json)."""

from __future__ import annotations

import math
import re
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from marshmallow import (INCLUDE, Schema, ValidationError, fields, post_load, pre_load, validate, validates,
                         validates_schema)

from shared.bots import (
    ACCOUNT_SID, AUTH_TOKEN, COLD_PUSH, ENGINE_URL, FALLBACK, LIMIT_ATTRIBUTES, MAX_ENGINE_CALLS, MAX_PER_DAY, MAX_PER_MINUTE,
    MAX_REPLIES, MAX_SEGMENTS, NAME, NUMBER, PACE, PUSH_WINDOW, USER_TYPE, CONTROL_ATTRIBUTES, HANDOFF_TIMEOUT, HANDOFF_URL,
    MERGE_WINDOW, MAX_QUEUED, MAX_SEGMENTS_PER_DAY,
)
from shared import keywords
from shared.bots import PHONE_NUMBERS, SENDING_ATTRIBUTES, SERVICE_SID, SERVICE_SID_PATTERN, SHORTEN_URLS, SMART_ENCODED, VALIDITY
from shared.bots import (HELP_MESSAGE, HELP_WORDS, HOURS_ATTRIBUTES, KEYWORD_ATTRIBUTES, OPT_IN_MESSAGE, OPT_IN_WORDS,
                         OPT_OUT_MESSAGE, OPT_OUT_WORDS, QUIET_HOURS, QUIET_ZONE)
from shared.phone import InvalidNumber, normalize_e164
from shared.schedule import MAX_AHEAD_SECONDS, quiet_window, zone
from shared.text import PlainText, plain

# Extra user fields are stored as given and returned by every GET: nested JSON once stored broke
# listing, showing and deleting bots, so only short scalars are kept.
MAX_EXTRA_FIELDS = 50
MAX_EXTRA_TEXT = 1000
MAX_EXTRA_INTEGER = 2**63
EXTRA_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
URL_CREDENTIALS = ("must not carry credentials (user:password@): the URL is stored and returned in plain text, "
                   "and a bot's engine is never sent them; an engine's credentials belong in the engine's own "
                   "configuration")


class PhoneNumber(fields.String):
    """An E.164 number; spaces, dashes and parentheses are tolerated and removed."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        try:
            return normalize_e164(value)
        except InvalidNumber as error:
            raise ValidationError(str(error)) from None


class PhoneNumbers(fields.Field):
    """E.164 numbers: a JSON list, or comma-separated (the seed's query string). Each is checked and
    normalized like main-phone-number; the first bad one is named."""

    MAX = 400  # a Messaging Service's default pool limit (Twilio error 21714)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValidationError("must be a list of E.164 numbers (or, in a query string, numbers separated by commas)")
        if len(value) > self.MAX:
            raise ValidationError(f"at most {self.MAX} numbers")
        numbers: list[str] = []
        for item in value:
            try:
                numbers.append(normalize_e164(item))
            except InvalidNumber as error:
                raise ValidationError(f"{item[:40]!r}: {error}") from None
        return list(dict.fromkeys(numbers))


class Flag(fields.Boolean):
    """true or false (or the seed's "true"/"false"), never 0 or 1: Python's 0 == False would let a
    number through that the API's description says is not a boolean."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class KeywordList(fields.Field):
    """Keywords: a JSON list, or comma-separated (the seed's query string); each a word or short
    phrase with a letter or digit."""

    def __init__(self, least: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.least = least

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        items = value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValidationError("must be a list of keywords (or, in a query string, keywords separated by commas)")
        words = [item.strip() for item in items]
        if not self.least <= len(words) <= keywords.MAX_KEYWORDS:
            raise ValidationError(f"must have {self.least} to {keywords.MAX_KEYWORDS} keywords")
        for given, word in zip(items, words):
            if not any(char.isalnum() for char in keywords.normalized(word)) \
                    or len(given) > keywords.MAX_KEYWORD_LENGTH:
                raise ValidationError(f"{word[:40]!r}: each keyword needs a letter or digit and at most "
                                      f"{keywords.MAX_KEYWORD_LENGTH} characters")
        # A keyword listed twice, here or in another list, is a conflict the registry answers (409):
        # no schema can say that "BAJA" and "bája" are one keyword.
        return words


def _keywords(name: str, least: int, description: str) -> KeywordList:
    return KeywordList(least, data_key=name, load_default=None, allow_none=True, metadata={"description": description})


def _answer(name: str, description: str) -> fields.String:
    return PlainText(data_key=name, load_default=None, allow_none=True,
                         validate=validate.Length(min=1, max=1600, error="must be 1 to 1600 characters"),
                         metadata={"description": description})


class SendAt(fields.Field):
    """When to send: RFC 3339 with its offset ("2026-12-24T09:00:00-06:00"), at most 30 days ahead;
    as Unix seconds. A moment a few minutes past is taken as now (clocks differ); older is a mistake."""

    PAST_TOLERANCE_SECONDS = 300

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        try:
            moment = datetime.fromisoformat(value) if isinstance(value, str) and "T" in value.upper() else None
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            raise ValidationError("must be an RFC 3339 time with its offset, e.g. 2026-12-24T09:00:00-06:00")
        at, now = moment.timestamp(), time.time()
        if at < now - self.PAST_TOLERANCE_SECONDS:
            raise ValidationError("is in the past")
        if at > now + MAX_AHEAD_SECONDS:
            raise ValidationError(f"must be at most {MAX_AHEAD_SECONDS // 86400} days ahead")
        return at


def _quiet_hours(value: str) -> None:
    if quiet_window(value) is None:
        raise ValidationError("must be HH:MM-HH:MM on a 24-hour clock, start and end different, e.g. 21:00-08:00")


def _time_zone(value: str) -> None:
    if zone(value) is None:
        raise ValidationError("must be an IANA time zone, e.g. America/Mexico_City")


def _flag(name: str, description: str) -> fields.Boolean:
    return Flag(data_key=name, load_default=None, allow_none=True, truthy={True, "true"},
                          falsy={False, "false"}, metadata={"description": description})


class WholeNumber(fields.Integer):
    """A whole number, from JSON or from the seed's query string ("10"): never true/false (which
    Python reads as 1/0), a fraction, or digits other than ASCII. JSON's 10.0 is 10, as JSON Schema
    (and so the API's description) counts it an integer."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, str) and value.isascii() and value.isdigit():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValidationError("must be a whole number")


def _limit(name: str, low: int, high: int, description: str) -> fields.Integer:
    return WholeNumber(data_key=name, load_default=None, allow_none=True,
                       validate=validate.Range(min=low, max=high, error=f"must be a whole number from {low} to {high}"),
                       metadata={"description": description})


class BotSchema(Schema):
    """A bot (a Mammut user of type machine) with its Twilio number; unknown user fields are kept as given."""

    class Meta:
        unknown = INCLUDE

    user_type = fields.String(
        data_key=USER_TYPE, required=True,
        validate=validate.Equal("machine", error="must be \"machine\": only machine users have an SMS channel"),
    )
    name = PlainText(data_key=NAME, required=True, validate=validate.Length(min=1, max=200))
    account_sid = fields.String(
        data_key=ACCOUNT_SID, required=True,
        validate=validate.Regexp(r"^AC[0-9a-fA-F]{32}$", error="must be a Twilio account SID: AC followed by 32 hex digits"),
    )
    auth_token = fields.String(
        data_key=AUTH_TOKEN, required=True, load_only=True,
        validate=validate.Regexp(r"^[!-~]{8,128}$", error="must be the account's primary auth token (no spaces)"),
    )
    number = PhoneNumber(data_key=NUMBER, load_default=None,
                         metadata={"description": "the bot's number, E.164; required unless it has a messaging service"})
    engine_url = fields.Url(data_key=ENGINE_URL, load_default=None, allow_none=True, schemes={"http", "https"},
                            require_tld=False)
    messages_per_second = fields.Float(
        data_key=PACE, load_default=None, allow_none=True,
        validate=validate.Range(min=0.01, max=1000, error="must be between 0.01 and 1000 segments per second"),
    )
    fallback_message = PlainText(data_key=FALLBACK, load_default=None, allow_none=True,
                                 validate=validate.Length(max=1600))
    # The bot's limits (shared.bots.Limits): null sets one back to its default.
    max_replies = _limit(MAX_REPLIES, 1, 100, "messages one engine answer may send")
    max_segments = _limit(MAX_SEGMENTS, 1, 300, "segments one engine answer may send")
    max_messages_per_day = _limit(MAX_PER_DAY, 0, 10_000_000, "sends per UTC day, past which replies wait (0: none)")
    max_replies_per_minute = _limit(MAX_PER_MINUTE, 0, 10_000, "replies per person a minute (0: none)")
    push_window_days = _limit(PUSH_WINDOW, 1, 3650, "days after a person's last text that the engine may push to them")
    allow_cold_push = Flag(data_key=COLD_PUSH, load_default=None, allow_none=True,
                                     truthy={True, "true"}, falsy={False, "false"},
                                     metadata={"description": "the engine may push to people who never wrote"})
    max_concurrent_engine_calls = _limit(MAX_ENGINE_CALLS, 1, 10_000, "engine calls in flight per worker process")
    max_segments_per_day = _limit(MAX_SEGMENTS_PER_DAY, 0, 100_000_000,
                                  "segments (what Twilio bills) per UTC day, past which replies wait (0: none)")
    max_queued_replies = _limit(MAX_QUEUED, 1, 1_000,
                                "replies waiting to one person past which the engine's callback is refused with 429")
    # Conversation controls (shared.bots.Controls, shared.handoff).
    handoff_url = fields.Url(data_key=HANDOFF_URL, load_default=None, allow_none=True, schemes={"http", "https"},
                             require_tld=False, metadata={
                                 "description": "where a handed-off conversation's messages are POSTed, signed with "
                                                "the handoff-secret shown once when this is first set"})
    handoff_timeout = _limit(HANDOFF_TIMEOUT, 0, 365 * 24 * 3600,
                             "seconds after which a handed-off conversation resumes by itself (0: never; default 86400)")
    merge_window_ms = _limit(MERGE_WINDOW, 0, 60_000,
                             "texts a person sends within this many ms of each other reach the engine as one turn (0: off)")

    # Messaging Services and number pools (shared.bots.Sending; README "Sending through a Messaging Service").
    messaging_service_sid = fields.String(
        data_key=SERVICE_SID, load_default=None, allow_none=True,
        validate=validate.Regexp(SERVICE_SID_PATTERN, error="must be a Messaging Service SID: MG followed by 32 hex digits"),
        metadata={"description": "the Twilio Messaging Service the bot sends through (its pool's numbers reach it too)"})
    phone_numbers = PhoneNumbers(data_key=PHONE_NUMBERS, load_default=None, allow_none=True, metadata={
        "description": "the bot's numbers besides main-phone-number, E.164; each belongs to one bot"})
    validity_period = _limit(VALIDITY, 1, 36_000, "seconds a message may wait in Twilio's queue (ValidityPeriod)")
    smart_encoded = _flag(SMART_ENCODED, "Twilio replaces Unicode look-alikes with GSM-7 characters (SmartEncoded)")
    shorten_urls = _flag(SHORTEN_URLS, "Twilio shortens links (ShortenUrls); needs a messaging service")

    # Keywords and the service's own answers to them (shared.bots.Keywords; README "Keywords").
    opt_out_keywords = _keywords(OPT_OUT_WORDS, 1, "whole texts that opt a person out (default STOP, STOPALL, ...)")
    opt_in_keywords = _keywords(OPT_IN_WORDS, 0, "whole texts that opt a person back in (default START, YES, UNSTOP)")
    help_keywords = _keywords(HELP_WORDS, 0, "whole texts that ask for help (default HELP, INFO)")
    keyword_set = fields.String(
        data_key="keyword-set", load_default=None, load_only=True,
        validate=validate.OneOf(sorted(keywords.KEYWORD_SETS), error="must be one of {choices}"),
        metadata={"description": "sets the three keyword lists at once to a documented set (es: English and Spanish)"})
    help_message = _answer(HELP_MESSAGE, "sent, instead of asking the engine, to a help keyword")
    opt_out_message = _answer(OPT_OUT_MESSAGE, "the one confirmation sent after an opt-out")
    opt_in_message = _answer(OPT_IN_MESSAGE, "the confirmation sent after an opt-in")

    # Quiet hours (shared.schedule; README "Quiet hours").
    quiet_hours = fields.String(data_key=QUIET_HOURS, load_default=None, allow_none=True, validate=_quiet_hours,
                                metadata={"description": "HH:MM-HH:MM in the recipient's time: only replies to their "
                                                         "own texts go then, the rest wait for the end"})
    quiet_hours_time_zone = fields.String(data_key=QUIET_ZONE, load_default=None, allow_none=True,
                                          validate=_time_zone, metadata={
                                              "description": "the IANA time zone of quiet-hours; default: each "
                                                             "recipient's own, from the number"})

    @validates_schema
    def _can_send(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not self.partial and not data.get("number") and not data.get("messaging_service_sid"):
            raise ValidationError(f"required unless the bot has a {SERVICE_SID}", "number")

    @validates("engine_url", "handoff_url")
    def _no_credentials(self, value: str | None, **kwargs: Any) -> None:
        if value and "@" in urlsplit(value).netloc:
            raise ValidationError(URL_CREDENTIALS)

    @validates_schema(pass_original=True)
    def _check_extras(self, data: dict[str, Any], original: Any, **kwargs: Any) -> None:
        extras = [key for key in data if key not in _FIELD_NAMES]
        if len(extras) > MAX_EXTRA_FIELDS:
            raise ValidationError(f"at most {MAX_EXTRA_FIELDS} additional user fields", "_schema")
        problems = {key: [problem] for key in extras if (problem := _extra_problem(key, data[key])) is not None}
        if problems:
            raise ValidationError(dict(list(problems.items())[:10]))

    @post_load
    def _as_fields(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Back to the API's own spelling, which the store keeps."""
        # Extra user fields are kept as given, but for control characters (a NUL: PostgreSQL refuses it).
        spelled = {_DATA_KEYS.get(key, key): plain(value) if isinstance(value, str) else value
                   for key, value in data.items()}
        spelled.pop(USER_TYPE, None)
        chosen = spelled.pop("keyword-set", None)
        if chosen is not None:  # lists given in the same call win over the set's
            for kind, words in keywords.KEYWORD_SETS[chosen].items():
                if spelled.get(f"{kind}-keywords") is None:
                    spelled[f"{kind}-keywords"] = list(words)
        # null keeps a field's default, but removes an extra user field.
        return {key: value for key, value in spelled.items()
                if value is not None or key in _NULLABLE or key not in _DATA_KEYS.values()}


def _extra_problem(name: object, value: object) -> str | None:
    """Why an additional user field cannot be stored, or None: only short scalars under plain names."""
    if not isinstance(name, str) or not EXTRA_NAME.fullmatch(name):
        return "is not a valid field name"
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return None if len(value) <= MAX_EXTRA_TEXT else f"must be at most {MAX_EXTRA_TEXT} characters"
    if isinstance(value, int):
        return None if abs(value) < MAX_EXTRA_INTEGER else "is too large a number"
    if isinstance(value, float):
        return None if math.isfinite(value) else "must be a finite number"
    return "must be a string, a number, true, false or null (lists and objects are not stored)"


class BotUpdateSchema(BotSchema):
    """An update: any subset of the bot's fields."""

    @pre_load
    def _no_id(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict) and "id" in data:
            raise ValidationError("a bot's id cannot be changed", "id")
        return data


class TaskResultSchema(Schema):
    """Mammut's answer to a write: which element was affected."""

    status = fields.String(metadata={"example": "Success"})
    taskResult = fields.List(fields.Dict(), metadata={"example": [{"affectedElementName": "user", "affectedElementId": 125678}]})


class FailedSchema(Schema):
    status = fields.String(metadata={"example": "Failed"})
    message = fields.String()
    errors = fields.Dict()


_FIELD_NAMES = {name for name in BotSchema._declared_fields}
_DATA_KEYS = {name: field.data_key or name for name, field in BotSchema._declared_fields.items()}
_NULLABLE = {ENGINE_URL, FALLBACK, HANDOFF_URL, *LIMIT_ATTRIBUTES, *CONTROL_ATTRIBUTES, SERVICE_SID, PHONE_NUMBERS,
             *SENDING_ATTRIBUTES, *KEYWORD_ATTRIBUTES, *HOURS_ATTRIBUTES}
CREATE = BotSchema()
UPDATE = BotUpdateSchema(partial=True)
