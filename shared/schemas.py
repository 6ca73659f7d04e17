"""Payloads of the bot registry API, as marshmallow schemas (also the source of /openapi.json)."""

from __future__ import annotations

import re
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, post_load, pre_load, validate, validates_schema

from shared.bots import ACCOUNT_SID, AUTH_TOKEN, ENGINE_URL, FALLBACK, NAME, NUMBER, PACE, USER_TYPE
from shared.phone import InvalidNumber, normalize_e164

MAX_EXTRA_FIELDS = 50
_EXTRA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")


class PhoneNumber(fields.String):
    """An E.164 number; spaces, dashes and parentheses are tolerated and removed."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        try:
            return normalize_e164(value)
        except InvalidNumber as error:
            raise ValidationError(str(error)) from None


class BotSchema(Schema):
    """A bot (a Mammut user of type machine) with its Twilio number; unknown user fields are kept as given."""

    class Meta:
        unknown = INCLUDE

    user_type = fields.String(
        data_key=USER_TYPE, required=True,
        validate=validate.Equal("machine", error="must be \"machine\": only machine users have an SMS channel"),
    )
    name = fields.String(data_key=NAME, required=True, validate=validate.Length(min=1, max=200))
    account_sid = fields.String(
        data_key=ACCOUNT_SID, required=True,
        validate=validate.Regexp(r"^AC[0-9a-fA-F]{32}$", error="must be a Twilio account SID: AC followed by 32 hex digits"),
    )
    auth_token = fields.String(
        data_key=AUTH_TOKEN, required=True, load_only=True,
        validate=validate.Regexp(r"^\S{8,128}$", error="must be the account's primary auth token (no spaces)"),
    )
    number = PhoneNumber(data_key=NUMBER, required=True)
    engine_url = fields.Url(data_key=ENGINE_URL, load_default=None, allow_none=True, schemes={"http", "https"},
                            require_tld=False)
    messages_per_second = fields.Float(
        data_key=PACE, load_default=None, allow_none=True,
        validate=validate.Range(min=0.01, max=1000, error="must be between 0.01 and 1000 segments per second"),
    )
    fallback_message = fields.String(data_key=FALLBACK, load_default=None, allow_none=True,
                                     validate=validate.Length(max=1600))

    @validates_schema(pass_original=True)
    def _check_extras(self, data: dict[str, Any], original: Any, **kwargs: Any) -> None:
        extras = [key for key in data if key not in _FIELD_NAMES]
        if len(extras) > MAX_EXTRA_FIELDS:
            raise ValidationError(f"at most {MAX_EXTRA_FIELDS} additional user fields", "_schema")
        bad = [key for key in extras if not _EXTRA_NAME.fullmatch(str(key))]
        if bad:
            raise ValidationError({key: ["is not a valid field name"] for key in bad[:10]})

    @post_load
    def _as_fields(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Back to the API's own spelling, which the store keeps."""
        spelled = {_DATA_KEYS.get(key, key): value for key, value in data.items()}
        spelled.pop(USER_TYPE, None)
        return {key: value for key, value in spelled.items() if value is not None or key in _NULLABLE}


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
_NULLABLE = {ENGINE_URL, FALLBACK}
CREATE = BotSchema()
UPDATE = BotUpdateSchema(partial=True)
