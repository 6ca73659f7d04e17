"""A bot's dead letters over the REST API: `GET /app:<app>/graph/user:<id>/dead-letters` lists the
replies that failed for good (oldest first, with why), `POST .../dead-letters/replay` with
`{"ids": [...]}` or `{"all": true}` sends them again. Only that bot's letters are listed or replayed.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from shared import dlq
from shared.bots import MAX_BOT_ID, Bot
from webhook import access
from webhook.deps import get_broker, get_engine, get_redis, get_store
from webhook.errors import failed

bp = Blueprint("deadletters", __name__)
bp.before_request(access.authenticate)

DEAD_LETTERS = f"/app:<app_id>/graph/user:<int(min=1, max={MAX_BOT_ID}):bot_id>/dead-letters"


def of_bot(bot_id: int) -> list[dict[str, Any]]:
    """The bot's dead letters, oldest first (the database's and Dramatiq's, as `mammut-sms dlq list`)."""
    return [entry for entry in dlq.list_dead_letters(get_redis(), get_broker(), get_engine())
            if entry["bot_id"] == bot_id]


def replay(bot_id: int, ids: list[str] | None) -> list[str]:
    """Send the bot's dead letters again (`ids` None: all of them); returns the ids replayed."""
    chosen = [entry["id"] for entry in of_bot(bot_id)
              if ids is None or {entry["id"], entry["reply_id"]} & set(ids)]
    return dlq.replay(get_redis(), get_broker(), ids=chosen, engine=get_engine()) if chosen else []


@bp.get(DEAD_LETTERS)
def list_dead_letters(app_id: str, bot_id: int) -> ResponseReturnValue:
    """The bot's replies that failed for good, oldest first, with why."""
    if _bot(bot_id) is None:
        return failed(f"no bot with id {bot_id}", 404)
    return jsonify(status="Success", data={"dead-letters": of_bot(bot_id)})


@bp.post(DEAD_LETTERS + "/replay")
def replay_dead_letters(app_id: str, bot_id: int) -> ResponseReturnValue:
    """Send some of the bot's dead letters again (`{"ids": [...]}`), or all of them (`{"all": true}`)."""
    if _bot(bot_id) is None:
        return failed(f"no bot with id {bot_id}", 404)
    body = request.get_json(silent=True)
    everything = body == {"all": True}
    if not everything and not (isinstance(body, dict) and set(body) == {"ids"} and _strings(body["ids"])):
        return failed('expected {"ids": ["...", ...]} or {"all": true}', 400)
    ids = None if everything else body["ids"]
    return jsonify(status="Success", data={"replayed": replay(bot_id, None if everything else ids)})


def _strings(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value)


def _bot(bot_id: int) -> Bot | None:
    return get_store().get(bot_id)
