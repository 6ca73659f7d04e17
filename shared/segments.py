"""SMS encoding, segment counting and message splitting for Twilio.

Pure functions, no I/O. Twilio bills (and carriers deliver) an SMS per
*segment*, and the segment size depends on the encoding the whole message
needs, so the worker uses these helpers to predict cost and to keep every
outgoing body under Twilio's hard length limit.

Rules implemented (from Twilio's documentation and GSM 03.38):

* A message made only of GSM-7 characters is sent as GSM-7: 160 septets in a
  single segment, 153 septets per segment once it has to be concatenated
  (the other 7 septets carry the concatenation header). Characters from the
  GSM-7 extension table take two septets (an escape plus the character), and
  the pair is never split across segments.
* A single character outside GSM-7 makes the *whole* message UCS-2: 70 UTF-16
  code units in a single segment, 67 per segment when concatenated. A
  character outside the Basic Multilingual Plane (most emoji) takes two code
  units, which are never split across segments.
* Twilio rejects a body longer than 1600 characters (error 21617), so longer
  text is sent as several messages; see :func:`split_message`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

__all__ = [
    "MAX_MESSAGE_CHARS",
    "count_segments",
    "encoding",
    "is_gsm7",
    "split_message",
]

MAX_MESSAGE_CHARS: Final = 1600
"""Twilio's limit on a message body (error 21617 above it).

Counted as Python ``len()``, i.e. Unicode code points, which is what Twilio
documents as "characters" for ordinary text. Twilio's docs are vague about
whether an astral character (an emoji) counts once or twice; if that ever
matters, pass a smaller ``limit`` to :func:`split_message`.
"""

GSM7_SINGLE_SEGMENT_SEPTETS: Final = 160
GSM7_MULTI_SEGMENT_SEPTETS: Final = 153
UCS2_SINGLE_SEGMENT_UNITS: Final = 70
UCS2_MULTI_SEGMENT_UNITS: Final = 67

GSM7_BASIC_CHARS: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ"  # 0x1B (escape) is not a character of its own
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
"""The GSM 03.38 default alphabet: one septet each."""

GSM7_EXTENSION_CHARS: Final = frozenset("\f^{}\\[~]|€")
"""The GSM 03.38 extension table: an escape septet plus one, so two each."""

_GSM7_CHARS: Final = GSM7_BASIC_CHARS | GSM7_EXTENSION_CHARS

# Whitespace we may cut at: anything str.isspace() accepts except the
# no-break spaces, which exist precisely to forbid a line break there.
_BREAKABLE_WHITESPACE: Final = re.compile(r"[^\S\u00a0\u2007\u202f]+")
_LINE_BREAKS: Final = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
# Fraction of the window, counted back from its end, in which a line or
# paragraph break is preferred over a later plain space.
_PREFERRED_BREAK_DIVISOR: Final = 5  # the last 20 %
_ZERO_WIDTH_JOINER: Final = "\u200d"


def is_gsm7(text: str) -> bool:
    """Return True if every character of ``text`` can be sent as GSM-7.

    Extension-table characters (``{`` ``€`` ...) count as GSM-7: they cost two
    septets but do not force UCS-2.
    """
    return all(char in _GSM7_CHARS for char in text)


def encoding(text: str) -> str:
    """Return ``"GSM-7"`` or ``"UCS-2"``, the encoding Twilio will send ``text`` in."""
    return "GSM-7" if is_gsm7(text) else "UCS-2"


def count_segments(text: str) -> int:
    """Return the number of SMS segments ``text`` is billed and delivered as.

    An empty text still costs one segment. Multi-segment messages are packed
    greedily, the way handsets and Twilio do, because a two-septet extension
    character or a two-unit emoji that does not fit at the end of a segment
    moves whole to the next one, so the count can exceed a plain division.
    """
    if is_gsm7(text):
        sizes = [2 if char in GSM7_EXTENSION_CHARS else 1 for char in text]
        single, multi = GSM7_SINGLE_SEGMENT_SEPTETS, GSM7_MULTI_SEGMENT_SEPTETS
    else:
        sizes = [_utf16_units(char) for char in text]
        single, multi = UCS2_SINGLE_SEGMENT_UNITS, UCS2_MULTI_SEGMENT_UNITS

    if sum(sizes) <= single:
        return 1
    segments, used = 1, 0
    for size in sizes:
        if used + size > multi:
            segments, used = segments + 1, 0
        used += size
    return segments


def split_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> list[str]:
    """Split ``text`` into message bodies of at most ``limit`` characters.

    Characters are code points (``len()``), see :data:`MAX_MESSAGE_CHARS`.

    * Text of at most ``limit`` characters is returned unchanged as ``[text]``.
    * Otherwise the text is cut at whitespace, preferring a paragraph break,
      then a line break, when one lies in the last 20 % of the window, and
      otherwise the last space that fits. The whitespace run at a cut is
      dropped; nothing else is, so ``" ".join(parts)`` reproduces the text
      with each whitespace run at a cut collapsed to one space.
    * A word longer than ``limit`` is hard-split (those cuts drop nothing,
      so they rejoin with ``""``). A hard cut never separates a UTF-16
      surrogate pair and, when the window allows, keeps combining marks,
      emoji ZWJ sequences, skin-tone modifiers and flags with their base.
    * Empty or whitespace-only parts are never produced, so an empty or
      whitespace-only ``text`` gives ``[]``: Twilio rejects an empty body.

    Raises ValueError if ``limit`` < 2, which could not hold a surrogate pair.
    """
    if limit < 2:
        raise ValueError(f"limit must be at least 2, got {limit}")
    if not text.strip():
        return []
    if len(text) <= limit:
        return [text]

    parts: list[str] = []
    start, length = 0, len(text)
    while length - start > limit:
        end = start + limit
        first = _skip_whitespace(text, start, end)
        cut = _whitespace_cut(text, first, end, limit) if first < end else None
        if cut is None and first > start:
            # Only the text's leading whitespace (the first window is the
            # only one that can start with any) keeps the next word from
            # fitting whole: drop it, as at a cut, rather than split the word.
            start = _skip_whitespace(text, start, length)
            continue
        if cut is None:
            cut = _hard_cut(text, start, end)
        parts.append(text[start:cut].rstrip())
        start = _skip_whitespace(text, cut, length)

    tail = text[start:]
    if tail.strip():
        parts.append(tail)
    return parts


def _utf16_units(char: str) -> int:
    """Return how many UTF-16 code units ``char`` takes in a UCS-2 SMS."""
    return 2 if ord(char) > 0xFFFF else 1


def _skip_whitespace(text: str, index: int, stop: int) -> int:
    """Return the first index in ``[index, stop)`` that is not whitespace, else ``stop``."""
    while index < stop and text[index].isspace():
        index += 1
    return index


def _whitespace_cut(text: str, first: int, end: int, limit: int) -> int | None:
    """Return where to end a part at whitespace, or None if there is none.

    ``first`` is the window's first non-whitespace index, so any run starting
    after it leaves the part with content; a run starting exactly at ``end``
    is allowed (the part is then exactly ``limit`` long).
    """
    preferred_from = end - limit // _PREFERRED_BREAK_DIVISOR
    last_space = last_line = last_paragraph = None
    for match in _BREAKABLE_WHITESPACE.finditer(text, first + 1):
        run_start = match.start()
        if run_start > end:
            break
        last_space = run_start
        if run_start >= preferred_from:
            run = match.group()
            line_breaks = sum(char in _LINE_BREAKS for char in run.replace("\r\n", "\n"))
            if line_breaks >= 2 or "\u2029" in run:
                last_paragraph = run_start
            elif line_breaks:
                last_line = run_start
    if last_paragraph is not None:
        return last_paragraph
    if last_line is not None:
        return last_line
    return last_space


def _hard_cut(text: str, start: int, end: int) -> int:
    """Return where to hard-split a word that does not fit ``text[start:end]``.

    Prefers the last position that keeps user-perceived characters whole;
    falls back to the window end, moved back one if it would split a
    surrogate pair (``end - start >= 2`` keeps that cut after ``start``).
    """
    for cut in range(end, start, -1):
        if _can_break_before(text, cut):
            return cut
    return end - 1 if _is_surrogate_pair(text, end) else end


def _is_surrogate_pair(text: str, index: int) -> bool:
    """Return True if ``text[index - 1:index + 1]`` is a UTF-16 surrogate pair.

    Python normally stores an emoji as one code point, but text decoded with
    ``surrogatepass`` (or built from UTF-16 units) can hold the two halves.
    """
    return "\ud800" <= text[index - 1] <= "\udbff" and "\udc00" <= text[index] <= "\udfff"


def _is_regional_indicator(char: str) -> bool:
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def _can_break_before(text: str, index: int) -> bool:
    """Return True if a hard cut between ``text[index - 1]`` and ``text[index]`` is harmless.

    An approximation of Unicode grapheme boundaries, good enough to keep
    accents, emoji sequences and flags intact in an SMS.
    """
    before, after = text[index - 1], text[index]
    if _is_surrogate_pair(text, index):
        return False
    if before == _ZERO_WIDTH_JOINER or after == _ZERO_WIDTH_JOINER:
        return False
    if unicodedata.category(after) in ("Mn", "Mc", "Me"):  # also variation selectors
        return False
    if "\U0001f3fb" <= after <= "\U0001f3ff" or "\U000e0020" <= after <= "\U000e007f":
        return False  # skin-tone modifiers; tag characters of subdivision flags
    if _is_regional_indicator(before) and _is_regional_indicator(after):
        run = 0
        position = index - 1
        while position >= 0 and _is_regional_indicator(text[position]):
            run += 1
            position -= 1
        return run % 2 == 0  # flags are pairs: only break between pairs
    return True
