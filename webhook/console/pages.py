"""The console's pages: inbox, conversation, dead letters, bots and overview, and their actions.

Each action is the REST API's own function (webhook.operator.send_as_bot, webhook.handoffs,
webhook.deadletters, webhook.registry.apply_update, the bot store's rotations, shared.erasure),
called with the console's form instead of a JSON body.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from flask import Response, abort, g, jsonify, make_response, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_babel import format_datetime, get_locale, gettext as _, ngettext
from werkzeug.exceptions import HTTPException

from shared import access, erasure, keys, messagelog, metrics
from shared import inbox as reading
from shared.bots import Bot, BotNotFound, InvalidBot, NumberTaken
from shared.logging import get_logger
from shared.phone import InvalidNumber, normalize_e164
from shared.segments import count_segments, encoding, split_message
from shared.twilio_errors import HINTS, STATUS_HINTS
from webhook import deadletters, handoffs, operator, registry
from webhook.console import auth, bp
from webhook.deps import get_engine, get_redis, get_settings, get_store

log = get_logger(__name__)

MESSAGES_SHOWN = 500
# The bot settings the console edits (the registry's fields, validated the same way).
EDITABLE = ("name", "engine-url", "fallback-message", "messages-per-second", "handoff-url", "handoff-timeout",
            "max-messages-per-day", "max-replies-per-minute", "max-segments", "validity-period")


@bp.errorhandler(HTTPException)
def problem_page(error: HTTPException) -> ResponseReturnValue:
    return render_template("problem.html", code=error.code, message=error.description), error.code or 500


@bp.app_context_processor
def console_globals() -> dict[str, Any]:
    if request.blueprint != bp.name:
        return {}
    if "console_principal" not in g:
        return {"get_locale": get_locale, "me": None}
    return {"get_locale": get_locale, "me": g.console_operator, "csrf": auth.csrf_token(),
            "is_admin": g.console_principal.is_admin}


def visible_bots() -> list[Bot]:
    return [bot for bot in get_store().all() if auth.principal().reaches(bot.id)]


def reachable_bot(bot_id: int) -> Bot:
    """The bot, if this operator may reach it; another bot is as absent as one that does not exist."""
    bot = get_store().get(bot_id)
    if bot is None or not auth.principal().reaches(bot_id):
        abort(404, _("No such bot."))
    return bot


def person_of(raw: str) -> str:
    try:
        return normalize_e164(unquote(raw))
    except InvalidNumber:
        abort(404, _("No such conversation."))


def require(action: str | None, bot_id: int | None = None) -> None:
    if not auth.principal().may(action, bot_id):
        abort(403, _("Your account may not do this."))


# --- inbox --------------------------------------------------------------------------------------


@bp.get("/")
def inbox() -> ResponseReturnValue:
    """Conversations of the operator's bots, latest activity first, with filters and a search."""
    bots = visible_bots()
    chosen = request.args.get("bot", type=int)
    only = request.args.get("only") if request.args.get("only") in reading.FILTERS else None
    search = request.args.get("q", "")[:100]
    scopes = [reading.BotScope(bot.id, bot.opt_out_key()) for bot in bots if chosen in (None, bot.id)]
    with get_engine().connect() as connection:
        items = reading.conversations_of(connection, scopes, only, search)
    seen = _seen()
    for item in items:
        item["unseen"] = item["last_at"] > seen.get(f"{item['bot_id']}:{item['person']}", 0.0)
    names = {bot.id: bot.name for bot in bots}
    template = "_inbox_list.html" if request.args.get("partial") else "inbox.html"
    return render_template(template, items=items, bots=bots, names=names, chosen=chosen, only=only, search=search,
                           filters=reading.FILTERS)


def _seen() -> dict[str, float]:
    """When this operator last opened each conversation: one that changed since stands out."""
    raw = get_redis().hgetall(_seen_key())
    return {conversation: float(at) for conversation, at in raw.items()}


def _seen_key() -> str:
    return keys.console_seen(g.console_operator.id)


# --- a conversation -----------------------------------------------------------------------------


@bp.get("/conversations/<int:bot_id>/<person>")
def conversation(bot_id: int, person: str) -> ResponseReturnValue:
    """The whole exchange with delivery states, who holds it, and the composer."""
    bot, number = reachable_bot(bot_id), person_of(person)
    before = request.args.get("before") or None
    page = _messages_before(bot, number, before)
    shown = list(reversed(page.items))
    for entry in shown:
        entry["problem"] = _why(entry.get("error-code"), entry["status"])
    get_redis().hset(_seen_key(), f"{bot.id}:{number}", time.time())
    if request.args.get("partial"):
        return render_template("_messages.html", messages=shown)
    _, _, opted_out = operator.sending_from(bot, get_redis(), number)
    held = handoffs.shown(bot.id, [number])[number]
    return render_template("conversation.html", bot=bot, person=number, messages=shown, held=held,
                           older=page.next, before=before, opted_out=opted_out, idempotency=secrets.token_urlsafe(16),
                           done=request.args.get("done"), problem=request.args.get("problem"),
                           may_erase=auth.principal().may(None, bot.id))


def _messages_before(bot: Bot, number: str, before: str | None) -> messagelog.Page:
    """The newest MESSAGES_SHOWN messages, or those older than `before` (the log's cursor, the REST log's `next`)."""
    try:
        with get_engine().connect() as connection:
            return messagelog.read(connection, bot.id, number, MESSAGES_SHOWN, newest_first=True, after=before)
    except messagelog.BadCursor:
        abort(404, _("No such conversation."))


def _why(code: int | None, status: str) -> str | None:
    """What a failure means, in the reader's language (the table's words are in the console's catalogs)."""
    if code:
        return _(HINTS[code]) if code in HINTS else _("Twilio error %(code)s", code=code)
    return _(STATUS_HINTS[status]) if status in STATUS_HINTS else None


def _back(bot: Bot, number: str, **notice: str) -> ResponseReturnValue:
    return redirect(url_for("console.conversation", bot_id=bot.id, person=number, **notice) + "#composer")


def _refused(bot: Bot, number: str, answer: Response) -> ResponseReturnValue:
    """Back to the conversation, saying why the REST function refused (its TaskResult message)."""
    return _back(bot, number, problem=json.loads(answer.get_data()).get("message", ""))


@bp.post("/conversations/<int:bot_id>/<person>/send")
def send(bot_id: int, person: str) -> ResponseReturnValue:
    """Send as the bot through the REST API's operator send (paced, logged, once per idempotency key)."""
    bot, number = reachable_bot(bot_id), person_of(person)
    require(access.SEND, bot.id)
    response = make_response(operator.send_as_bot(bot.id, body={"to": number, "text": request.form.get("text", "")},
                                                  idempotency_key=request.form.get("idempotency", "")))
    return _back(bot, number, done="sent") if response.status_code == 202 else _refused(bot, number, response)


@bp.post("/conversations/<int:bot_id>/<person>/take-over")
def take_over(bot_id: int, person: str) -> ResponseReturnValue:
    """Pause the bot for this person (REST: POST .../handoff), noting who took it."""
    bot, number = reachable_bot(bot_id), person_of(person)
    require(access.HANDOFF, bot.id)
    answer = make_response(handoffs.pause(bot, number, {"note": _("taken over by %(email)s",
                                                                  email=g.console_operator.email)}))
    return _back(bot, number, done="taken") if answer.status_code == 200 else _refused(bot, number, answer)


@bp.post("/conversations/<int:bot_id>/<person>/hand-back")
def hand_back(bot_id: int, person: str) -> ResponseReturnValue:
    """Give the conversation back to the bot (REST: DELETE .../handoff)."""
    bot, number = reachable_bot(bot_id), person_of(person)
    require(access.HANDOFF, bot.id)
    answer = make_response(handoffs.resume(bot, number))
    return _back(bot, number, done="handed-back") if answer.status_code == 200 else _refused(bot, number, answer)


@bp.post("/conversations/<int:bot_id>/<person>/erase")
def erase(bot_id: int, person: str) -> ResponseReturnValue:
    """Erase the conversation (admins), once the number is typed again to confirm."""
    bot, number = reachable_bot(bot_id), person_of(person)
    require(None, bot.id)
    if request.form.get("confirm", "").strip() != number:
        return _back(bot, number, problem=_("Type the number to confirm the erasure."))
    erased = erasure.erase(get_engine(), get_redis(), bot.id, number)
    log.info("console.conversation_erased", bot_id=bot.id, person=number, by=g.console_operator.email,
             **erased.public())
    return redirect(url_for("console.inbox"))


@bp.post("/segments")
def segments() -> ResponseReturnValue:
    """How a text would go: characters, messages, segments and encoding (shared.segments, as the sender counts)."""
    text = (request.get_json(silent=True) or {}).get("text", "") if request.is_json else request.form.get("text", "")
    text = text if isinstance(text, str) else ""
    parts = split_message(text) if text else [""]
    characters, segments_, encoded = len(text), sum(count_segments(p) for p in parts), encoding(text)
    # The counter as the operator reads it, in their language, "1 segment" and "2 segments" alike.
    label = " · ".join((ngettext("%(num)s character", "%(num)s characters", characters),
                        ngettext("%(num)s segment", "%(num)s segments", segments_), encoded))
    return jsonify(characters=characters, messages=len(parts), segments=segments_, encoding=encoded, label=label)


# --- dead letters -------------------------------------------------------------------------------


@bp.get("/dead-letters")
def dead_letters() -> ResponseReturnValue:
    """The replies that failed for good, of the operator's bots, with why."""
    bots = visible_bots()
    require(access.DEAD_LETTERS)
    letters = [{**entry, "why": _why(entry.get("error_code"), "") or entry.get("error") or entry["reason"]}
               for bot in bots for entry in deadletters.of_bot(bot.id)]
    return render_template("dead_letters.html", letters=sorted(letters, key=lambda e: e["failed_at"]),
                           names={bot.id: bot.name for bot in bots}, replayed=request.args.get("replayed"))


@bp.post("/dead-letters/replay")
def replay() -> ResponseReturnValue:
    """Replay one dead letter (`bot` and `id`), or all of the operator's (`all`)."""
    require(access.DEAD_LETTERS)
    if request.form.get("all"):
        replayed = [i for bot in visible_bots() for i in deadletters.replay(bot.id, None)]
    else:
        bot = reachable_bot(request.form.get("bot", type=int) or 0)
        replayed = deadletters.replay(bot.id, [request.form.get("id", "")])
    return redirect(url_for("console.dead_letters", replayed=len(replayed)))


# --- bots (admins) ------------------------------------------------------------------------------


@bp.get("/bots")
def bots() -> ResponseReturnValue:
    """Every bot, its settings, and the URLs to paste into Twilio's console."""
    require(None)
    base = (get_settings().public_url or request.host_url.rstrip("/"))
    return render_template("bots.html", bots=get_store().all(), editable=EDITABLE, base=base,
                           shown_once=None, problem=request.args.get("problem"), done=request.args.get("done"))


@bp.post("/bots/<int:bot_id>/settings")
def bot_settings(bot_id: int) -> ResponseReturnValue:
    """Change a bot's settings through the registry's own validation."""
    require(None)
    bot = get_store().get(bot_id)
    if bot is None:
        abort(404, _("No such bot."))
    shown = bot.public()
    # Only what the person changed: a field sent back as shown (an engine URL's key shown as ***) stays as
    # stored, and one emptied is unset, as the API's null (a limit back to its default).
    changes = {name: value or None for name in EDITABLE if name in request.form
               and (value := request.form[name].strip()) != _as_shown(shown.get(name))}
    if not changes:
        return redirect(url_for("console.bots", done=str(bot_id)))
    try:
        registry.apply_update(bot_id, changes)
    except registry.BadRequest as error:
        return redirect(url_for("console.bots", problem=error.message))
    except (BotNotFound, NumberTaken, InvalidBot) as error:
        return redirect(url_for("console.bots", problem=str(error) or _("No such bot.")))
    return redirect(url_for("console.bots", done=str(bot_id)))


def _as_shown(value: object) -> str:
    """A setting as the form shows it (templates print None as empty)."""
    return "" if value is None else str(value)


@bp.post("/bots/<int:bot_id>/<any('engine-token', 'handoff-secret'):secret>")
def rotate(bot_id: int, secret: str) -> ResponseReturnValue:
    """A new engine token or handoff secret, shown on this page once (the registry's rotation)."""
    require(None)
    store = get_store()
    bot = store.get(bot_id)
    if bot is None:
        abort(404, _("No such bot."))
    if secret == "handoff-secret" and not bot.handoff_url:
        return redirect(url_for("console.bots", problem=_("The bot has no handoff URL.")))
    value = store.rotate_engine_token(bot_id) if secret == "engine-token" else store.rotate_handoff_secret(bot_id)
    log.info("console.rotated", bot_id=bot_id, secret=secret, by=g.console_operator.email)
    base = (get_settings().public_url or request.host_url.rstrip("/"))
    return render_template("bots.html", bots=store.all(), editable=EDITABLE, base=base,
                           shown_once={"bot": bot_id, "name": secret, "value": value}, problem=None, done=None)


# --- overview -----------------------------------------------------------------------------------


@bp.get("/overview")
def overview() -> ResponseReturnValue:
    """The last 24 hours per bot, with its engine's answer times as the workers recorded them."""
    bots = visible_bots()
    with get_engine().connect() as connection:
        figures = reading.last_day(connection, [bot.id for bot in bots])
    most = max([1, *(max(f["in"], f["out"]) for f in figures.values())])
    latency = metrics.engine_latency(get_redis(), [bot.id for bot in bots])
    return render_template("overview.html", bots=bots, figures=figures, most=most, latency=latency)


@bp.app_template_filter("when")
def when(at: float | None) -> str:
    """A time as the reader's language writes it (UTC)."""
    return format_datetime(datetime.fromtimestamp(at or 0, timezone.utc), "short") if at else ""
