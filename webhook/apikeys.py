"""API keys scoped to a role and some bots, managed by an admin (the admin token or an admin's key):
`POST /app:<app>/api-keys` makes one (the key shown once), `GET` lists them without secrets,
`DELETE /app:<app>/api-keys/<id>` revokes one at once.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from marshmallow import RAISE, Schema, ValidationError, fields, validate

from shared import access as roles, apikeys
from shared.bots import MAX_BOT_ID
from shared.db import transaction
from shared.logging import get_logger
from shared.schemas import WholeNumber
from webhook import access
from webhook.deps import get_engine, get_store
from webhook.errors import failed

log = get_logger(__name__)
bp = Blueprint("apikeys", __name__)
bp.before_request(access.authenticate)

KEYS = "/app:<app_id>/api-keys"
MAX_BOTS = 1000
MAX_KEY_ID = MAX_BOT_ID  # a database integer


class BotId(WholeNumber):
    """A bot id in JSON: a whole number (10.0 is 10, as JSON Schema counts it), never a string."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, str):
            raise ValidationError("must be a whole number")
        return super()._deserialize(value, attr, data, **kwargs)


class ApiKeySchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(required=True, validate=[validate.Length(1, 200), validate.Regexp(
        r"^[^\x00-\x1f\x7f]*$", error="must be printable: no control characters")])
    role = fields.String(required=True, validate=validate.OneOf(roles.ROLES))
    bots = fields.List(BotId(validate=validate.Range(min=1, max=MAX_BOT_ID)), load_default=list,
                       validate=validate.Length(max=MAX_BOTS),
                       metadata={"description": "the bot ids it may reach; none: every bot of the app"})


API_KEY = ApiKeySchema()


def unknown_bots(bot_ids: list[int]) -> list[int]:
    """The ids in `bot_ids` that name no bot (a scope must name bots that exist)."""
    known = {bot.id for bot in get_store().all()}
    return sorted(set(bot_ids) - known)


@bp.post(KEYS)
def create_api_key(app_id: str) -> ResponseReturnValue:
    """A new API key for a role and some bots; the key is in this answer only."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return failed("expected a JSON object {name, role, bots}", 400)
    try:
        data: dict[str, Any] = API_KEY.load(body)
    except ValidationError as error:
        messages = error.normalized_messages()
        return failed("invalid API key: " + "; ".join(f"{k}: {v}" for k, v in messages.items()), 400, messages)
    if missing := unknown_bots(data["bots"]):
        return failed(f"no bot with id {', '.join(map(str, missing))}", 409, {"bots": ["unknown bot ids"]})
    with transaction(get_engine()) as connection:
        key_id, key = apikeys.create(connection, data["name"], data["role"], data["bots"])
    log.info("apikeys.created", key_id=key_id, role=data["role"], bots=data["bots"], by=access.current().name)
    return jsonify(status="Success", data={"id": key_id, "key": key, "name": data["name"], "role": data["role"],
                                           "bots": sorted(set(data["bots"]))}), 201


@bp.get(KEYS)
def list_api_keys(app_id: str) -> ResponseReturnValue:
    """Every API key, without its secret."""
    with get_engine().connect() as connection:
        return jsonify(status="Success", data={"api-keys": apikeys.list_all(connection)})


@bp.delete(KEYS + f"/<int(min=1, max={MAX_KEY_ID}):key_id>")
def revoke_api_key(app_id: str, key_id: int) -> ResponseReturnValue:
    """Revoke a key: the next request with it answers 401."""
    with transaction(get_engine()) as connection:
        revoked = apikeys.revoke(connection, key_id)
    if not revoked:
        return failed(f"no API key with id {key_id}", 404)
    log.info("apikeys.revoked", key_id=key_id, by=access.current().name)
    return jsonify(status="Success", data={"revoked": key_id})
