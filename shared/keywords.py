"""A bot's keywords: which whole texts opt a person out, back in, or ask for help, in the bot's languages.

A text is a keyword when, with surrounding whitespace and punctuation removed and accents folded,
it equals one whatever its case: " bája. " is BAJA, "STOP!" is STOP. The record of who opted out
is shared.optout's; this module only says what a text means.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping

# What an inbound text stands for (the engine is told it as metadata.event).
MESSAGE, OPT_OUT, OPT_IN, HELP = "message", "opt_out", "opt_in", "help"

OPT_OUT_KEYWORDS = ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT")
OPT_IN_KEYWORDS = ("START", "YES", "UNSTOP")
HELP_KEYWORDS = ("HELP", "INFO")

# The sets an operator applies in one call (`keyword-set`): each kind's words. "es" keeps the English
# ones, which carriers and Twilio know, and adds those Spanish speakers text.
KEYWORD_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {"opt-out": OPT_OUT_KEYWORDS, "opt-in": OPT_IN_KEYWORDS, "help": HELP_KEYWORDS},
    "es": {
        "opt-out": (*OPT_OUT_KEYWORDS, "BAJA", "ALTO", "PARAR", "CANCELAR", "DETENER"),
        "opt-in": (*OPT_IN_KEYWORDS, "ALTA", "INICIAR"),
        "help": (*HELP_KEYWORDS, "AYUDA"),
    },
}

MAX_KEYWORDS = 20  # per list
MAX_KEYWORD_LENGTH = 30


def normalized(text: str | None) -> str:
    """`text` as keywords are compared: accents folded, upper case, without the whitespace and
    punctuation around it (people type "Stop.", " baja! ", "¡Alto!")."""
    text = text or ""
    if text.isascii():  # most texts: nothing to fold
        folded = text.upper()
    else:
        decomposed = unicodedata.normalize("NFKD", text)
        folded = "".join(char for char in decomposed if not unicodedata.combining(char)).upper()
    start, end = 0, len(folded)
    while start < end and _is_edge(folded[start]):
        start += 1
    while end > start and _is_edge(folded[end - 1]):
        end -= 1
    return folded[start:end]


def _is_edge(char: str) -> bool:
    return char.isspace() or unicodedata.category(char)[0] in "PZC"


def events(opt_out: Iterable[str], opt_in: Iterable[str], help_words: Iterable[str]) -> dict[str, str]:
    """Each keyword, as compared, with the event it stands for."""
    return {**{normalized(word): HELP for word in help_words}, **{normalized(word): OPT_IN for word in opt_in},
            **{normalized(word): OPT_OUT for word in opt_out}}


def event_of(body: str | None, meanings: Mapping[str, str] | None = None) -> str:
    """The event a whole text stands for under `meanings` (by default the English keywords)."""
    if len(body or "") > _LONGEST_KEYWORD_TEXT and len((body or "").strip()) > _LONGEST_KEYWORD_TEXT:
        return MESSAGE  # most texts: no need to fold a sentence to know it is not one keyword
    return (DEFAULT_EVENTS if meanings is None else meanings).get(normalized(body), MESSAGE)


# A keyword with its accents typed as combining marks and some punctuation around it stays within this.
_LONGEST_KEYWORD_TEXT = 2 * MAX_KEYWORD_LENGTH


DEFAULT_EVENTS = events(OPT_OUT_KEYWORDS, OPT_IN_KEYWORDS, HELP_KEYWORDS)
