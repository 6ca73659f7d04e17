"""Tests for shared.segments: SMS encoding, segment counting and message splitting."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.segments import (
    MAX_MESSAGE_CHARS,
    count_segments,
    encoding,
    is_gsm7,
    split_message,
)

GSM7_BASIC_ALPHABET = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION_ALPHABET = "^{}\\[~]|€\f"
GRINNING_FACE = "\U0001f600"  # outside the BMP: two UTF-16 code units
HIGH_SURROGATE = re.compile("[\ud800-\udbff]\\Z")
LOW_SURROGATE = re.compile("^[\udc00-\udfff]")


def prose(length: int) -> str:
    """Return deterministic single-spaced prose of exactly `length` characters."""
    words = itertools.cycle("the quick brown fox jumps over a lazy dog while bots reply".split())
    text = " ".join(itertools.islice(words, length))[:length]
    return text[:-1] + "x" if text.endswith(" ") else text


def without_whitespace(text: str) -> str:
    """Return `text` with every whitespace character removed."""
    return "".join(text.split())


def assert_parts_are_text_minus_cut_whitespace(text: str, parts: list[str]) -> None:
    """Assert the parts occur in `text` in order, separated by nothing but whitespace."""
    position = 0
    for part in parts:
        found = text.index(part, position)
        assert "" == text[position:found].strip()
        position = found + len(part)
    assert "" == text[position:].strip()


# --- encoding ---------------------------------------------------------------


def test_whole_basic_gsm7_alphabet_is_gsm7() -> None:
    """Every character of the GSM 03.38 default alphabet is GSM-7."""
    assert 127 == len(GSM7_BASIC_ALPHABET)
    assert "GSM-7" == encoding(GSM7_BASIC_ALPHABET)


@pytest.mark.parametrize("char", list(GSM7_EXTENSION_ALPHABET))
def test_extension_table_character_is_gsm7(char: str) -> None:
    """An extension-table character does not force UCS-2."""
    assert is_gsm7("price " + char)


@pytest.mark.parametrize("char", ["á", "í", "ó", "ú", "ç", "’", "“", "—", "`", "e\u0301", GRINNING_FACE])
def test_character_outside_gsm7_makes_message_ucs2(char: str) -> None:
    """One character outside GSM-7 (accents, smart punctuation, emoji) makes the whole message UCS-2."""
    assert "UCS-2" == encoding("Hello there " + char)


def test_empty_text_is_gsm7() -> None:
    """An empty text needs no UCS-2 character, so it is GSM-7."""
    assert "GSM-7" == encoding("")


def test_spanish_with_only_gsm7_accents_is_gsm7() -> None:
    """é ñ ü à ¿ ¡ are in GSM-7, so this Spanish greeting stays GSM-7."""
    assert "GSM-7" == encoding("¿Qué tal?")
    assert "GSM-7" == encoding("¡Añoranza del pingüino en el café!")


def test_spanish_with_acute_vowel_is_ucs2() -> None:
    """ó and á are not in GSM-7, so "¿Cómo estás?" is UCS-2."""
    assert "UCS-2" == encoding("¿Cómo estás?")


# --- count_segments -----------------------------------------------------------


def test_empty_text_is_one_segment() -> None:
    """Even an empty message costs one segment."""
    assert 1 == count_segments("")


@pytest.mark.parametrize(
    ("length", "expected"),
    [(1, 1), (160, 1), (161, 2), (306, 2), (307, 3), (459, 3), (460, 4)],
)
def test_gsm7_segments_hold_160_septets_alone_or_153_when_concatenated(length: int, expected: int) -> None:
    """GSM-7 fits 160 characters in one segment and 153 per segment beyond that."""
    assert expected == count_segments("a" * length)


@pytest.mark.parametrize(
    ("length", "expected"),
    [(1, 1), (70, 1), (71, 2), (134, 2), (135, 3), (201, 3), (202, 4)],
)
def test_ucs2_segments_hold_70_units_alone_or_67_when_concatenated(length: int, expected: int) -> None:
    """UCS-2 fits 70 code units in one segment and 67 per segment beyond that."""
    assert expected == count_segments("ó" * length)


def test_ucs2_character_shrinks_segment_capacity_for_whole_message() -> None:
    """100 GSM-7 characters plus one ó are 101 UCS-2 units, so two segments instead of one."""
    assert 1 == count_segments("a" * 100)
    assert 2 == count_segments("a" * 100 + "ó")


def test_extension_characters_count_as_two_septets() -> None:
    """80 '{' are 160 septets (one segment) and 81 are 162 septets (two segments)."""
    assert 1 == count_segments("{" * 80)
    assert 2 == count_segments("{" * 81)
    assert 2 == count_segments("a" * 159 + "€")


def test_extension_character_at_segment_boundary_moves_to_next_segment() -> None:
    """A '{' whose two septets would straddle the 153-septet boundary starts the next segment."""
    straddling = "a" * 152 + "{" + "a" * 152  # 306 septets, but the '{' cannot be split
    fitting = "a" * 151 + "{" + "a" * 153  # 306 septets, '{' ends the first segment exactly
    assert 3 == count_segments(straddling)
    assert 2 == count_segments(fitting)


def test_emoji_counts_two_utf16_units() -> None:
    """35 emoji are 70 units (one segment) and 36 are 72 units (two segments)."""
    assert 1 == count_segments(GRINNING_FACE * 35)
    assert 2 == count_segments(GRINNING_FACE * 36)


def test_emoji_at_segment_boundary_moves_to_next_segment() -> None:
    """An emoji whose two code units would straddle the 67-unit boundary starts the next segment."""
    straddling = "a" * 66 + GRINNING_FACE + "a" * 66  # 134 units, but the emoji cannot be split
    fitting = "a" * 65 + GRINNING_FACE + "a" * 67  # 134 units, emoji ends the first segment exactly
    assert 3 == count_segments(straddling)
    assert 2 == count_segments(fitting)


# --- split_message --------------------------------------------------------------


def test_prose_helper_builds_text_of_requested_length() -> None:
    """The prose fixture is exactly as long as asked and single-spaced."""
    text = prose(4000)
    assert 4000 == len(text)
    assert "  " not in text


def test_text_exactly_at_limit_is_returned_unchanged() -> None:
    """A 1600-character body, surrounding whitespace included, is sent as is."""
    text = " " + prose(MAX_MESSAGE_CHARS - 2) + "\n"
    assert [text] == split_message(text)


def test_text_one_over_limit_is_split() -> None:
    """A 1601-character body no longer fits in one message."""
    assert 2 == len(split_message(prose(MAX_MESSAGE_CHARS + 1)))


@pytest.mark.parametrize("text", ["", " ", " \n\t \r\n"])
def test_empty_or_whitespace_only_text_gives_no_parts(text: str) -> None:
    """There is nothing worth sending, and Twilio rejects an empty body."""
    assert [] == split_message(text)


def test_long_prose_is_cut_at_spaces_within_limit_losing_nothing() -> None:
    """4000 characters of prose become three parts of at most 1600 cut only at spaces."""
    text = prose(4000)
    parts = split_message(text)
    assert 3 == len(parts)
    assert all(len(part) <= MAX_MESSAGE_CHARS for part in parts)
    assert text == " ".join(parts)
    assert all(part == part.strip() for part in parts)


def test_single_word_longer_than_limit_is_hard_split() -> None:
    """A 2000-character word with no whitespace is split at the limit."""
    assert ["x" * 1600, "x" * 400] == split_message("x" * 2000)


def test_long_word_among_short_ones_is_split_only_once_it_overflows() -> None:
    """Short words stay whole; only the overlong word is hard-split."""
    text = "hi " + "x" * 2000 + " bye"
    assert ["hi", "x" * 1600, "x" * 400 + " bye"] == split_message(text)


def test_whitespace_run_at_cut_is_dropped() -> None:
    """The whole whitespace run at a cut disappears, so the parts rejoin with one space."""
    text = "a" * 1500 + " \t \n  " + "b" * 500
    assert ["a" * 1500, "b" * 500] == split_message(text)


def test_paragraph_break_in_last_fifth_of_window_is_preferred() -> None:
    """A blank line near the end of the window wins over later spaces."""
    first = prose(1400)
    second = prose(1000)
    assert [first, second] == split_message(first + "\n\n" + second)


def test_line_break_in_last_fifth_of_window_is_preferred() -> None:
    """A newline near the end of the window wins over later spaces."""
    first = prose(1400)
    second = prose(1000)
    assert [first, second] == split_message(first + "\n" + second)


def test_paragraph_break_early_in_window_is_not_preferred() -> None:
    """A blank line in the first 80% of the window would waste space, so the last space is used."""
    text = prose(500) + "\n\n" + prose(3000)
    parts = split_message(text)
    assert parts[0].startswith(prose(500) + "\n\n")
    assert len(parts[0]) > 1500


def test_no_break_space_is_not_a_cut_point() -> None:
    """The split never happens at a no-break space, e.g. between a number and its unit."""
    text = "x" * 1590 + " 12345678\u00a0km " + "y" * 100
    assert ["x" * 1590, "12345678\u00a0km " + "y" * 100] == split_message(text)


def test_leading_whitespace_is_dropped_rather_than_splitting_a_word() -> None:
    """Leading whitespace that would push a fitting word over the limit is dropped instead."""
    word = "x" * MAX_MESSAGE_CHARS
    assert [word, "tail"] == split_message("   " + word + " tail")
    assert ["hello"] == split_message(" " * 2000 + "hello")


def test_hard_split_never_separates_surrogate_pair() -> None:
    """A word of UTF-16 surrogate pairs is hard-split only between pairs."""
    text = "a" + "\ud83d\ude00" * 1000
    parts = split_message(text)
    assert text == "".join(parts)
    assert all(len(part) <= MAX_MESSAGE_CHARS for part in parts)
    assert not any(
        HIGH_SURROGATE.search(before) and LOW_SURROGATE.search(after)
        for before, after in itertools.pairwise(parts)
    )


@pytest.mark.parametrize(
    "cluster",
    [
        "e\u0301",  # e + combining acute accent
        "\U0001f469\u200d\U0001f467",  # woman ZWJ girl
        "\U0001f44d\U0001f3fd",  # thumbs up + skin tone
        "\U0001f1ea\U0001f1f8",  # flag of Spain (two regional indicators)
    ],
)
def test_hard_split_keeps_user_perceived_character_whole(cluster: str) -> None:
    """A hard cut moves back rather than separate an accent, emoji sequence or flag from its base."""
    text = "x" * (MAX_MESSAGE_CHARS - 1) + cluster + "x" * 100
    parts = split_message(text)
    assert ["x" * (MAX_MESSAGE_CHARS - 1), cluster + "x" * 100] == parts


def test_limit_below_two_is_rejected() -> None:
    """A limit under two characters could not hold a surrogate pair."""
    with pytest.raises(ValueError, match="at least 2"):
        split_message("hello", limit=1)


def test_custom_limit_is_respected() -> None:
    """A smaller limit is filled up to exactly its length before cutting."""
    assert ["hola mundo", "bonito"] == split_message("hola mundo bonito", limit=10)


TRICKY_PIECES = [
    " ",
    "  ",
    "\n",
    "\n\n",
    "\r\n",
    "\t",
    "\u00a0",
    "\u2029",
    "e\u0301",
    "\u200d",
    "\U0001f1ea",
    "\U0001f3fd",
    "\ud83d\ude00",  # a surrogate pair as two code points
    GRINNING_FACE,
    "word",
]
texts = st.lists(st.one_of(st.sampled_from(TRICKY_PIECES), st.characters()), max_size=300).map("".join)


@settings(database=None, max_examples=300)
@given(text=texts, limit=st.integers(min_value=2, max_value=60))
def test_split_parts_fit_are_never_blank_and_lose_only_whitespace(text: str, limit: int) -> None:
    """For any text, parts fit the limit, none is blank, and only whitespace is lost."""
    parts = split_message(text, limit)
    assert all(len(part) <= limit for part in parts)
    assert all(part.strip() for part in parts)
    assert without_whitespace(text) == without_whitespace("".join(parts))
    assert_parts_are_text_minus_cut_whitespace(text, parts)
    assert not any(
        HIGH_SURROGATE.search(before) and LOW_SURROGATE.search(after)
        for before, after in itertools.pairwise(parts)
    )


@settings(database=None, max_examples=300)
@given(
    words=st.lists(st.text(alphabet="abcdé", min_size=1, max_size=20), min_size=1, max_size=60),
    separators=st.lists(st.sampled_from([" ", "  ", "\n", "\n\n", " \t "]), min_size=60, max_size=60),
    limit=st.integers(min_value=20, max_value=80),
)
def test_split_never_cuts_inside_a_word_that_fits(words: list[str], separators: list[str], limit: int) -> None:
    """When every word fits the limit, joining parts with one space gives the text with cut whitespace collapsed."""
    text = "".join(word + separator for word, separator in zip(words, separators)).rstrip()
    parts = split_message(text, limit)
    assert words == " ".join(parts).split()
    assert all(len(part) <= limit for part in parts)
    assert_parts_are_text_minus_cut_whitespace(text, parts)
