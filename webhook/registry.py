"""The bot registry API, in the shape Mammut documents for its SMS channel.

Bots are Mammut users of type machine, addressed as /app:<app>/graph/user:<id>; answers use
Mammut's TaskResult shape, which Mammut's own API client parses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, unquote_plus

from flask import Blueprint, Response, jsonify, request
from marshmallow import ValidationError
from sqlalchemy import Connection
from werkzeug.exceptions import NotFound

from shared import erasure, messagelog, schedule
from shared.bots import (AUTH_TOKEN, HANDOFF_SECRET, HELP_WORDS, MAX_BOT_ID, NUMBER, OPT_IN_WORDS, OPT_OUT_WORDS,
                         PHONE_NUMBERS, Bot, BotNotFound, InvalidBot, KeywordConflict, NumberTaken)
from shared.db import transaction
from shared.logging import get_logger
from shared.phone import InvalidNumber, normalize_e164
from shared.schemas import CREATE, UPDATE
from webhook import access, handoffs, operator
from webhook.deps import get_engine, get_redis, get_store
from webhook.errors import failed

log = get_logger(__name__)
bp = Blueprint("registry", __name__)

USER = "/app:<app_id>/graph/user"
ONE_USER = "/app:<app_id>/graph/user:<bot_id>"
# A '+' in these fields is the number's own, not form encoding's space.
_LITERAL_PLUS = frozenset({NUMBER, PHONE_NUMBERS, "with"})
# The bot's engine token, in the answer that creates or rotates it (its only appearance).
ENGINE_TOKEN = "engine-token"


class BadRequest(Exception):
    def __init__(self, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message, self.errors = message, errors


@bp.errorhandler(BadRequest)
def bad_request(error: BadRequest):  # type: ignore[no-untyped-def]
    return failed(error.message, 400, error.errors)


@bp.before_request
def authenticate():  # type: ignore[no-untyped-def]
    """Every registry call needs the admin token or an API key allowed this call (webhook.access)."""
    return access.authenticate()


@bp.post(USER)
def create_bot(app_id: str):  # type: ignore[no-untyped-def]
    fields = _validated(CREATE, _json_body(required=True))
    try:
        bot, engine_token = get_store().create_with_token(fields)
    except NumberTaken as taken:  # the number (or service) and the bot that has it
        return failed(str(taken), 409, {taken.field: [str(taken)]})
    except KeywordConflict as conflict:  # a schema cannot say "BAJA" and "bája" are one keyword
        return failed(f"conflicting user fields: {conflict}", 409, {conflict.field: [conflict.problem]})
    except InvalidBot as invalid:
        return failed(f"invalid user fields: {invalid}", 400, {invalid.field: [invalid.problem]})
    log.info("registry.created", bot_id=bot.id, number=bot.number)
    shown_once = {ENGINE_TOKEN: engine_token, **({HANDOFF_SECRET: bot.handoff_secret} if bot.handoff_secret else {})}
    return _task_result(bot.id, "created", shown_once)


@bp.post(ONE_USER + "/engine-token")
def rotate_engine_token(app_id: str, bot_id: str):  # type: ignore[no-untyped-def]
    """A new engine token for the bot (shown this once); the old one stops working."""
    bot_id_number = _bot_id(bot_id)
    try:
        engine_token = get_store().rotate_engine_token(bot_id_number)
    except BotNotFound:
        return failed(f"no bot with id {bot_id_number}", 404)
    log.info("registry.engine_token_rotated", bot_id=bot_id_number)
    return _task_result(bot_id_number, "engine-token-rotated", {ENGINE_TOKEN: engine_token})


@bp.post(ONE_USER + "/handoff-secret")
def rotate_handoff_secret(app_id: str, bot_id: str):  # type: ignore[no-untyped-def]
    """A new key for the bot's handoff forwards (shown this once); forwards are signed with it at once."""
    bot = _bot(bot_id)
    if not bot.handoff_url:
        return failed("the bot has no handoff-url: set one, and its secret is made and shown then", 409)
    secret = get_store().rotate_handoff_secret(bot.id)
    log.info("registry.handoff_secret_rotated", bot_id=bot.id)
    return _task_result(bot.id, "handoff-secret-rotated", {HANDOFF_SECRET: secret})


@bp.get(USER)
def list_bots(app_id: str):  # type: ignore[no-untyped-def]
    principal = access.current()
    bots = [bot.public() for bot in get_store().all() if principal.reaches(bot.id)]
    return jsonify(status="Success", data={"user": bots})


@bp.post(ONE_USER)
def update_bot(app_id: str, bot_id: str):  # type: ignore[no-untyped-def]
    bot_id_number = _bot_id(bot_id)
    changes = {**_json_body(required=False), **_query_lists(_query_fields())}
    if not changes:
        raise BadRequest("nothing to update: send fields in the query string or a JSON body")
    try:
        bot, shown_once = apply_update(bot_id_number, changes)
    except BotNotFound:
        return failed(f"no bot with id {bot_id_number}", 404)
    except NumberTaken as taken:  # the number (or service) and the bot that has it
        return failed(str(taken), 409, {taken.field: [str(taken)]})
    except InvalidBot as invalid:  # valid alone, not with the bot's other fields (shorten-urls without a service)
        return failed(f"conflicts with the bot's other fields: {invalid}", 409, {invalid.field: [invalid.problem]})
    return _task_result(bot.id, "updated", shown_once)


def apply_update(bot_id: int, changes: dict[str, Any]) -> tuple[Bot, dict[str, str]]:
    """Validate and store a bot's changed fields (the console's bot settings take this path too);
    raises BadRequest, BotNotFound, NumberTaken or InvalidBot."""
    fields = _validated(UPDATE, changes)
    bot, shown_once = get_store().update_with_secrets(bot_id, fields)
    log.info("registry.updated", bot_id=bot.id, number=bot.number, fields=sorted(k for k in fields if k != AUTH_TOKEN))
    return bot, shown_once


@bp.get(ONE_USER)
@bp.get("/app:<app_id>/graph:<int:depth>/user:<bot_id>")
def show_bot(app_id: str, bot_id: str, depth: int = 1):  # type: ignore[no-untyped-def]
    bot = get_store().get(_bot_id(bot_id))
    if bot is None:
        return failed(f"no bot with id {bot_id}", 404)
    return jsonify(status="Success", data={"user": [bot.public()]})


@bp.delete(ONE_USER)
def delete_bot(app_id: str, bot_id: str):  # type: ignore[no-untyped-def]
    bot_id_number = _bot_id(bot_id)
    if not get_store().delete(bot_id_number):
        return failed(f"no bot with id {bot_id_number}", 404)
    log.info("registry.deleted", bot_id=bot_id_number)
    return _task_result(bot_id_number, "deleted")


@bp.get(ONE_USER + "/messages")
def conversation_log(app_id: str, bot_id: str):  # type: ignore[no-untyped-def]
    """The bot's messages with one person, a page at a time, each with its delivery status."""
    bot = get_store().get(_bot_id(bot_id))
    if bot is None:
        return failed(f"no bot with id {bot_id}", 404)
    query = _query_fields()
    raw = query.get("with")
    if not raw:
        raise BadRequest("the query parameter 'with' (the person's number, E.164) is required")
    try:
        person = normalize_e164(raw)
    except InvalidNumber as error:
        raise BadRequest(str(error), {"with": [str(error)]}) from None
    limit, newest_first, after = _paging(query, newest_by_default=False)
    page = _read_page(lambda connection: messagelog.read(connection, bot.id, person, limit, newest_first, after))
    return jsonify(status="Success", data={"messages": page.items, "next": page.next,
                                           "handoff": handoffs.shown(bot.id, [person])[person]})


@bp.get(ONE_USER + "/conversations")
def conversation_list(app_id: str, bot_id: str):  # type: ignore[no-untyped-def]
    """The people the bot has talked to, most recent first, each with the latest message and opt-out state."""
    bot = get_store().get(_bot_id(bot_id))
    if bot is None:
        return failed(f"no bot with id {bot_id}", 404)
    limit, newest_first, after = _paging(_query_fields(), newest_by_default=True)
    page = _read_page(
        lambda connection: messagelog.conversations_of(connection, bot.id, bot.opt_out_key(), limit, newest_first, after))
    paused = handoffs.shown(bot.id, [item["person"] for item in page.items])
    items = [{**item, "handoff": paused[item["person"]]} for item in page.items]
    return jsonify(status="Success", data={"conversations": items, "next": page.next})


@bp.post(ONE_USER + "/conversations/<person>/handoff")
def pause_conversation(app_id: str, bot_id: str, person: str):  # type: ignore[no-untyped-def]
    """Hand the conversation to a human: the bot's engine is not asked until it is resumed (or the
    bot's handoff-timeout passes); the person's messages go to the bot's handoff-url, if it has one."""
    return handoffs.pause(_bot(bot_id), _person(person), _json_body(required=False))


@bp.delete(ONE_USER + "/conversations/<person>/handoff")
def resume_conversation(app_id: str, bot_id: str, person: str):  # type: ignore[no-untyped-def]
    """Give the conversation back to the bot."""
    return handoffs.resume(_bot(bot_id), _person(person))


@bp.post(ONE_USER + "/messages")
def send_as_bot(app_id: str, bot_id: str):  # type: ignore[no-untyped-def]
    """Text a person from the bot's number, without the engine (webhook.operator)."""
    return operator.send_as_bot(_bot_id(bot_id))


@bp.get(ONE_USER + "/scheduled")
def scheduled_messages(app_id: str, bot_id: str):  # type: ignore[no-untyped-def]
    """The bot's scheduled messages and those held through quiet hours, soonest first, with their state."""
    bot = _bot(bot_id)
    query = _query_fields()
    state = query.get("state") or None
    if state is not None and state not in schedule.STATES:
        raise BadRequest(f"state must be one of {', '.join(schedule.STATES)}", {"state": ["unknown state"]})
    limit, _, _ = _paging({"limit": query.get("limit", str(messagelog.DEFAULT_LIMIT))}, newest_by_default=False)
    with get_engine().connect() as connection:
        items = schedule.of_bot(connection, bot.id, state, limit)
    return jsonify(status="Success", data={"scheduled": [item.public() for item in items]})


@bp.delete(ONE_USER + "/scheduled/<scheduled_id>")
def cancel_scheduled(app_id: str, bot_id: str, scheduled_id: str):  # type: ignore[no-untyped-def]
    """Cancel a scheduled (or held) message that has not gone yet."""
    bot = _bot(bot_id)
    with transaction(get_engine()) as connection:
        cancelled = schedule.finish(connection, scheduled_id, schedule.CANCELLED, bot_id=bot.id)
        item = schedule.read(connection, bot.id, scheduled_id)
    if item is None:
        return failed(f"no scheduled message {scheduled_id!r} for bot {bot.id}", 404)
    if not cancelled:
        return failed(f"the message is {item.state}, no longer waiting: it cannot be cancelled", 409,
                      {"state": [item.state]})
    log.info("registry.scheduled_cancelled", bot_id=bot.id, scheduled_id=scheduled_id)
    return jsonify(status="Success", data={"scheduled": item.public()})


@bp.delete(ONE_USER + "/conversations/<person>")
def erase_conversation(app_id: str, bot_id: str, person: str):  # type: ignore[no-untyped-def]
    """Erase what the service keeps of one person's conversation with the bot (shared.erasure says
    what goes and what stays); nothing queued for them is sent afterwards."""
    bot = _bot(bot_id)
    number = _person(person)
    erased = erasure.erase(get_engine(), get_redis(), bot.id, number)
    log.info("registry.conversation_erased", bot_id=bot.id, person=number, **erased.public())
    return jsonify(status="Success", data={"erased": erased.public()})


def _paging(query: dict[str, str], newest_by_default: bool) -> tuple[int, bool, str | None]:
    """`limit` (1-1000), `order` (newest or oldest) and `after` (the `next` of the previous page)."""
    raw_limit = query.get("limit", str(messagelog.DEFAULT_LIMIT))
    if not _is_ascii_number(raw_limit) or not 1 <= int(raw_limit) <= messagelog.MAX_LIMIT:
        problem = f"must be a whole number from 1 to {messagelog.MAX_LIMIT}"
        raise BadRequest(f"limit {problem}", {"limit": [problem]})
    order = query.get("order", "newest" if newest_by_default else "oldest")
    if order not in ("newest", "oldest"):
        raise BadRequest("order must be 'newest' or 'oldest'", {"order": ["must be 'newest' or 'oldest'"]})
    return int(raw_limit), order == "newest", query.get("after") or None


def _read_page(read: Callable[[Connection], messagelog.Page]) -> messagelog.Page:
    try:
        with get_engine().connect() as connection:
            return read(connection)
    except messagelog.BadCursor as error:
        raise BadRequest(str(error), {"after": ["pass the `next` of the previous page, as given"]}) from None


def _bot(raw: str) -> Bot:
    bot = get_store().get(_bot_id(raw))
    if bot is None:
        raise NotFound(f"no bot with id {raw}")
    return bot


def _person(raw: str) -> str:
    """A person's number from the path ('+' as itself or %2B)."""
    try:
        return normalize_e164(unquote(raw))
    except InvalidNumber as error:
        raise BadRequest(str(error), {"person": [str(error)]}) from None


def _bot_id(raw: str) -> int:
    if not _is_ascii_number(raw) or not 1 <= int(raw) <= MAX_BOT_ID:
        raise NotFound(f"no bot with id {raw!r}")
    return int(raw)


def _is_ascii_number(raw: str) -> bool:
    # str.isdigit() is true of "²" and "５", which int() then refuses or reads as 5.
    return raw.isascii() and raw.isdigit()


def _task_result(bot_id: int, action: str, shown_once: dict[str, str] | None = None) -> Response:
    return jsonify(status="Success", taskResult=[
        {"affectedElementName": "user", "affectedElementId": bot_id, "affectedElementType": "machine", "action": action,
         **(shown_once or {})},
    ])


def _json_body(required: bool) -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if not raw.strip():
        if required:
            raise BadRequest("the request needs a JSON object body (Content-Type: application/json)")
        return {}
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise BadRequest(f"malformed JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    except RecursionError:
        raise BadRequest("the JSON body is nested too deeply: user fields are strings, numbers or booleans") from None
    except ValueError as error:  # an integer past Python's 4,300-digit limit, say
        raise BadRequest(f"unreadable JSON: {str(error)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    return body


def _query_fields() -> dict[str, str]:
    """The query string as Mammut's clients send it: `&` or `;` between pairs, values maybe in double quotes."""
    raw = request.query_string.decode("utf-8", "replace")
    fields: dict[str, str] = {}
    for pair in raw.replace(";", "&").split("&"):
        name, sep, value = pair.partition("=")
        name = unquote_plus(name).strip()
        if not name:
            continue
        value = unquote(value) if name in _LITERAL_PLUS else unquote_plus(value)
        fields[name] = _unquoted(value.strip())
    return fields


LIST_FIELDS = frozenset({PHONE_NUMBERS, OPT_OUT_WORDS, OPT_IN_WORDS, HELP_WORDS})


def _query_lists(fields: dict[str, Any]) -> dict[str, Any]:
    """The query string's lists, comma-separated ("BAJA, ALTO,") as the lists a JSON body gives: an
    empty item (a trailing comma) is no item, and an empty value is an empty list."""
    return {name: [item.strip() for item in value.split(",") if item.strip()] if name in LIST_FIELDS else value
            for name, value in fields.items()}


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _validated(schema: Any, data: dict[str, Any]) -> dict[str, Any]:
    try:
        return schema.load(data)
    except ValidationError as error:
        messages = error.messages if isinstance(error.messages, dict) else {"_schema": error.messages}
        if AUTH_TOKEN in messages and "slack-bot-token" in data:
            messages["slack-bot-token"] = ["not a field of the SMS channel: send the Twilio auth token as twilio-auth-token"]
        summary = "; ".join(f"{field}: {' '.join(map(str, problems))}" for field, problems in messages.items())
        raise BadRequest(f"invalid user fields: {summary}", messages) from None
