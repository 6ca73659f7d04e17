"""Keywords per bot: which whole texts opt a person out, back in or ask for help, in the bot's
languages, and the answers the service itself gives them."""

from __future__ import annotations

from typing import Any

import pytest
import redis as redis_lib
import requests
from flask.testing import FlaskClient

from cli.twilio_standin import TwilioStandin
from shared import keys
from shared.bots import Bot, Keywords
from shared.keywords import KEYWORD_SETS
from shared.optout import HELP, MESSAGE, OPT_IN, OPT_OUT, classify
from tests.support.fake_engine import FakeEngine
from tests.test_flushall import API, BOT_A, Service, bodies_to, private_redis, redis_server, service, wait_until

__all__ = ["private_redis", "redis_server", "service"]  # fixtures this module's tests use

SPANISH = Keywords.from_stored({f"{kind}-keywords": list(words) for kind, words in KEYWORD_SETS["es"].items()})


@pytest.mark.parametrize(("body", "expected"), [
    ("BAJA", OPT_OUT), (" bája. ", OPT_OUT), ("Alto", OPT_OUT), ("¡PARAR!", OPT_OUT), ("cancelar", OPT_OUT),
    ("Detener\n", OPT_OUT), ("Bájá", OPT_OUT), (" stop! ", OPT_OUT), ("alta", OPT_IN), ("Iniciar.", OPT_IN),
    ("START", OPT_IN), ("AYUDA", HELP), ("¿ayuda?", HELP), ("Info", HELP), ("baja ya", MESSAGE),
    ("hola", MESSAGE), ("", MESSAGE),
])
def test_the_spanish_set_matches_whole_texts_whatever_their_case_accents_and_punctuation(body: str,
                                                                                           expected: str) -> None:
    """With the Spanish set, " bája. " is BAJA and "¡ayuda?" is AYUDA; a keyword inside a sentence is a message."""
    assert expected == classify(body, None, SPANISH.event_of)



@pytest.mark.parametrize("body", ["STOP\u200b", "\ufeffbaja", "\u200e¡Alto!\u200f"])
def test_invisible_format_characters_around_a_keyword_do_not_hide_it(body: str) -> None:
    """A zero-width space, a byte-order mark or a direction mark a keyboard or a paste left around "BAJA"
    leaves it an opt-out: the person cannot see them, and would be texted after saying stop."""
    assert OPT_OUT == classify(body, None, SPANISH.event_of)


@pytest.mark.parametrize(("body", "expected"), [("BAJA", MESSAGE), ("AYUDA", MESSAGE), ("help", HELP),
                                                ("Stop.", OPT_OUT), ("yes", OPT_IN)])
def test_by_default_the_keywords_are_the_english_ones_plus_help(body: str, expected: str) -> None:
    """A bot that set no keywords keeps today's English lists, with HELP and INFO for help."""
    assert expected == Keywords().event_of(body)


def test_twilios_opt_out_type_wins_over_the_bots_keywords() -> None:
    """Advanced Opt-Out's OptOutType decides even over a help or opt-in keyword of the bot's."""
    assert (OPT_OUT, OPT_IN) == (classify("AYUDA", "STOP", SPANISH.event_of), classify("BAJA", "START", SPANISH.event_of))


# --- The registry ---------------------------------------------------------------------------

def update(client: FlaskClient, headers: dict[str, str], bot: Bot, query: str = "", **json: Any) -> Any:
    return client.post(f"{API}:{bot.id}{query}", headers=headers, json=json or None)


def test_keyword_set_es_sets_the_three_lists_in_one_call(client: FlaskClient, admin_headers: dict[str, str],
                                                         bot: Bot) -> None:
    """`keyword-set: "es"` gives the documented English and Spanish lists, shown by GET."""
    assert 200 == update(client, admin_headers, bot, **{"keyword-set": "es"}).status_code
    shown = client.get(f"{API}:{bot.id}", headers=admin_headers).get_json()["data"]["user"][0]
    assert {"BAJA", "ALTO", "PARAR", "CANCELAR", "DETENER", "STOP"} <= set(shown["opt-out-keywords"])
    assert {"ALTA", "INICIAR", "START"} <= set(shown["opt-in-keywords"])
    assert ["HELP", "INFO", "AYUDA"] == shown["help-keywords"]
    assert (None, None, None) == (shown["help-message"], shown["opt-out-message"], shown["opt-in-message"])
    assert "keyword-set" not in shown


def test_keywords_are_set_from_the_seeds_query_string(client: FlaskClient, admin_headers: dict[str, str],
                                                      bot: Bot) -> None:
    """Comma-separated in double quotes, like phone-numbers; null sets a list back to its default."""
    assert 200 == update(client, admin_headers, bot, '?help-keywords="AYUDA,SOCORRO"&help-message="Escribe BAJA"'
                         ).status_code
    shown = client.get(f"{API}:{bot.id}", headers=admin_headers).get_json()["data"]["user"][0]
    assert (["AYUDA", "SOCORRO"], "Escribe BAJA") == (shown["help-keywords"], shown["help-message"])
    assert 200 == update(client, admin_headers, bot, **{"help-keywords": None}).status_code
    assert ["HELP", "INFO"] == client.get(f"{API}:{bot.id}", headers=admin_headers).get_json()["data"]["user"][0][
        "help-keywords"]


@pytest.mark.parametrize(("change", "field"), [
    ({"help-keywords": ["STOP"]}, "help-keywords"),  # also a default opt-out keyword
    ({"opt-out-keywords": ["BAJA"], "opt-in-keywords": ["baja!"]}, "opt-in-keywords"),
    ({"opt-out-keywords": ["BAJA", "bája"]}, "opt-out-keywords"),  # one keyword, twice in a list
    ({"help-keywords": ["0", " 0"]}, "help-keywords"),  # what a fuzzer makes of the schema's uniqueItems
])
def test_a_keyword_in_two_lists_is_a_409_naming_the_field(client: FlaskClient, admin_headers: dict[str, str],
                                                          bot: Bot, change: dict[str, Any], field: str) -> None:
    """Each list valid alone, the two together not: 409, as for any field that conflicts with the bot's
    others (the API's contract: a request its schema allows is refused only for the resource's state)."""
    response = update(client, admin_headers, bot, **change)
    assert (409, [field]) == (response.status_code, list(response.get_json()["errors"]))


def test_a_new_bot_whose_keyword_is_in_two_lists_is_a_409_too(client: FlaskClient,
                                                                admin_headers: dict[str, str]) -> None:
    """Creating a bot is held to the same contract as updating one: valid by the schema, refused as a conflict."""
    response = client.post(API, headers=admin_headers, json={
        "user-type": "machine", "name": "Citas", "twilio-account-sid": "AC" + "1" * 32, "twilio-auth-token": "t" * 32,
        "main-phone-number": "+15551139999", "opt-out-keywords": ["BAJA"], "help-keywords": ["Baja"]})
    assert (409, ["help-keywords"]) == (response.status_code, list(response.get_json()["errors"]))
    assert [] == client.get(API, headers=admin_headers).get_json()["data"]["user"]


@pytest.mark.parametrize(("change", "field"), [
    ({"opt-out-keywords": []}, "opt-out-keywords"),
    ({"help-keywords": [f"W{n}" for n in range(21)]}, "help-keywords"),
    ({"help-keywords": ["x" * 31]}, "help-keywords"),
    ({"help-keywords": ["..."]}, "help-keywords"),
    ({"help-keywords": [["AYUDA"]]}, "help-keywords"),
    ({"help-message": "x" * 1601}, "help-message"),
    ({"opt-out-message": ""}, "opt-out-message"),
    ({"keyword-set": "fr"}, "keyword-set"),
])
def test_bad_keywords_and_messages_are_a_400_naming_the_field(client: FlaskClient, admin_headers: dict[str, str],
                                                               bot: Bot, change: dict[str, Any], field: str) -> None:
    """Bounded counts and lengths, no repeats: else 400 with the field at fault."""
    response = update(client, admin_headers, bot, **change)
    assert (400, [field]) == (response.status_code, list(response.get_json()["errors"]))


def test_a_keyword_another_list_has_is_refused_against_the_bots_stored_lists(
        client: FlaskClient, admin_headers: dict[str, str], bot: Bot) -> None:
    """A later update is checked against what the bot already has, not only against itself."""
    assert 200 == update(client, admin_headers, bot, **{"keyword-set": "es"}).status_code
    response = update(client, admin_headers, bot, **{"help-keywords": ["Alto"]})
    assert (409, ["help-keywords"]) == (response.status_code, list(response.get_json()["errors"]))


# --- Through the Procfile's web and worker ----------------------------------------------------

ANA, BEA, CRUZ, DORA = "+15551130001", "+15551130002", "+15551130003", "+15551130004"
HELP_TEXT = "Bot de ayuda. Escribe BAJA para no recibir mensajes."
BYE_TEXT = "Listo: no recibirás más mensajes. Escribe ALTA para volver."
WELCOME_TEXT = "¡Bienvenido de nuevo!"


def configure(service: Service, bot_id: int, fields: dict[str, Any]) -> None:
    response = requests.post(f"{service.base}{API}:{bot_id}", headers=service.headers, json=fields, timeout=10)
    assert 200 == response.status_code, response.text


def test_spanish_keywords_opt_out_confirm_once_and_answer_help_without_the_engine(
        service: Service, engine: FakeEngine, twilio: TwilioStandin, private_redis: redis_lib.Redis) -> None:
    """BAJA, " bája. " and Alto opt out with the Spanish set: each person gets the confirmation
    once and nothing after it, the next push to them is not sent and an operator's is refused;
    AYUDA gets the bot's help message once, and the engine is never asked; ALTA is confirmed."""
    # Given a bot with the Spanish set, a help message and an opt-out confirmation
    bot_id = service.register(BOT_A)
    configure(service, bot_id, {"engine-url": engine.url, "keyword-set": "es", "help-message": HELP_TEXT,
                                "opt-out-message": BYE_TEXT, "opt-in-message": WELCOME_TEXT})
    token = requests.post(f"{service.base}{API}:{bot_id}/engine-token", headers=service.headers,
                          timeout=10).json()["taskResult"][0]["engine-token"]
    for person in (ANA, BEA, CRUZ):  # each has talked to the bot, so a push may reach them
        assert 200 == service.text(BOT_A, person, "hola")
    wait_until(lambda: all(bodies_to(twilio, person) and service.log(bot_id, person) for person in (ANA, BEA, CRUZ)),
               what="the first answers, logged (the push window reads the log)")

    # When they text the opt-out keywords as people type them, and someone else asks for help
    for person, body in ((ANA, "BAJA"), (BEA, " bája. "), (CRUZ, "Alto")):
        assert 200 == service.text(BOT_A, person, body)
    assert 200 == service.text(BOT_A, DORA, "AYUDA")

    # Then each is confirmed once, and the help text is the bot's own
    wait_until(lambda: all(len(bodies_to(twilio, person)) == 2 for person in (ANA, BEA, CRUZ))
               and bodies_to(twilio, DORA), what="the confirmations and the help message")
    for person in (ANA, BEA, CRUZ):
        assert ["reply to hola", BYE_TEXT] == bodies_to(twilio, person)
    assert [HELP_TEXT] == bodies_to(twilio, DORA)
    assert DORA not in {call.sender for call in engine.calls}
    # and the next push reaches none of them, while an operator's is refused outright
    pushed = requests.post(f"{service.base}/channels/sms/callback/{bot_id}", timeout=10,
                           headers={"Authorization": f"Bearer {token}"},
                           json=[{"recipient_id": person, "text": "¿sigues ahí?"} for person in (ANA, BEA, CRUZ)])
    assert 202 == pushed.status_code, pushed.text
    refused = requests.post(f"{service.base}{API}:{bot_id}/messages", headers=service.headers, timeout=10,
                            json={"to": ANA, "text": "hola de nuevo"})
    assert 409 == refused.status_code
    for person in (ANA, BEA, CRUZ):
        wait_until(lambda: [entry["status"] for entry in service.log(bot_id, person)
                            if entry["text"] == "¿sigues ahí?"] == ["suppressed"], what="the push suppressed")
    # (the engine's own answer to each opt-out, and the push, were suppressed: nothing after the confirmation)
    wait_until(lambda: private_redis.zcard(keys.PENDING) == 0, what="every conversation settled")
    assert {2} == {len(bodies_to(twilio, person)) for person in (ANA, BEA, CRUZ)}
    assert [HELP_TEXT] == bodies_to(twilio, DORA)
    # until one texts ALTA: the opt-in confirmation comes first, then the engine's answer
    assert 200 == service.text(BOT_A, ANA, "Alta")
    wait_until(lambda: len(bodies_to(twilio, ANA)) == 4, what="the opt-in confirmation and answer")
    assert ["reply to hola", BYE_TEXT, WELCOME_TEXT, "reply to Alta"] == bodies_to(twilio, ANA)
