"""The REST API's credentials: `ADMIN_API_TOKEN` (the app-wide admin) or a scoped API key, both as
`Authorization: Bearer ...`. Each endpoint names the action it takes (shared.access); an endpoint
not named here is an admin's. A bot in the path outside the key's scope answers 403.
"""

from __future__ import annotations

import hmac

from flask import g, request
from flask.typing import ResponseReturnValue

from shared import access, apikeys
from shared.access import Principal
from webhook.deps import get_engine, get_settings
from webhook.errors import failed

ENDPOINT_ACTIONS: dict[str, str] = {
    "registry.list_bots": access.READ_BOTS,
    "registry.show_bot": access.READ_BOTS,
    "registry.conversation_log": access.READ_CONVERSATIONS,
    "registry.conversation_list": access.READ_CONVERSATIONS,
    "registry.send_as_bot": access.SEND,
    "registry.pause_conversation": access.HANDOFF,
    "registry.resume_conversation": access.HANDOFF,
    "deadletters.list_dead_letters": access.DEAD_LETTERS,
    "deadletters.replay_dead_letters": access.DEAD_LETTERS,
}
UNAUTHORIZED = "missing or wrong bearer token (Authorization: Bearer $ADMIN_API_TOKEN or an API key)"


def bearer() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def identify(token: str) -> Principal | None:
    """Whom a bearer token speaks for: the admin token, an API key, or nobody."""
    if not token:
        return None
    expected = get_settings().admin_api_token or ""
    if expected and hmac.compare_digest(token.encode(), expected.encode()):
        return access.ADMIN_TOKEN
    with get_engine().connect() as connection:
        return apikeys.principal(connection, token)


def current() -> Principal:
    """The principal `authenticate` admitted for this request."""
    return g.principal


def authenticate() -> ResponseReturnValue | None:
    """A blueprint's before_request: 401 without a credential, 403 outside its scope, 404 for another app."""
    principal = identify(bearer())
    if principal is None:
        response, status = failed(UNAUTHORIZED, 401)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response, status
    view_args = request.view_args or {}
    if view_args.get("app_id") != get_settings().app_id:
        return failed(f"unknown application {view_args.get('app_id')!r}", 404)
    bot_id = _bot_in_path(view_args)
    if not principal.may(ENDPOINT_ACTIONS.get(request.endpoint or ""), bot_id):
        return failed(f"{principal.name} ({principal.role}) may not do this"
                      + (f" for bot {bot_id}" if bot_id is not None else ""), 403)
    g.principal = principal
    return None


def _bot_in_path(view_args: dict[str, object]) -> int | None:
    raw = str(view_args.get("bot_id", ""))
    return int(raw) if raw.isascii() and raw.isdigit() else None
