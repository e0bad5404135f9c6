"""Placeholders back into text: whole answers, JSON arguments, and streams
split anywhere."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from veil_pii import restore
from veil_pii.placeholders import PlaceholderMap, parse_placeholder
from veil_pii.restore import (
    StreamRestorer,
    find_placeholders,
    json_escape,
    restore_json_arguments,
    restore_spans,
    restore_text,
)


def table(*pairs: tuple[str, str]) -> PlaceholderMap:
    t = PlaceholderMap()
    for kind, value in pairs:
        t.assign(kind, value)
    return t


ZOE = table(("PERSON", "Zoe Young"), ("EMAIL_ADDRESS", "zoe@acme.com"))
TWELVE = table(
    *(("PERSON", f"Name{i}") for i in range(1, 13)),
    ("EMAIL_ADDRESS", "e@x.io"),
    ("CODE", "code one"),
    ("CODE", "code two"),
    ("CODE_2", "code-2 one"),  # <CODE_2> and <CODE_2_1>: types that prefix each other
)


def stream(restorer: StreamRestorer, pieces: list[str]) -> str:
    """Feed ``pieces``, checking the held-back contract after every feed."""
    out = []
    for piece in pieces:
        out.append(restorer.feed(piece))
        assert len(restorer.held) <= restorer.max_held
    return "".join(out) + restorer.flush()


def test_all_is_sorted() -> None:
    assert restore.__all__ == sorted(restore.__all__)


def test_same_value_same_placeholder_and_numbers_per_type() -> None:
    t = PlaceholderMap()
    assert t.assign("PERSON", "Zoe Young") == "<PERSON_1>"
    assert t.assign("PERSON", "zoe  young") == "<PERSON_1>"
    assert t.assign("PERSON", "Liam") == "<PERSON_2>"
    assert t.assign("EMAIL_ADDRESS", "a@b.co") == "<EMAIL_ADDRESS_1>"
    assert PlaceholderMap(t.entries).assign("PERSON", "Noah") == "<PERSON_3>"
    assert parse_placeholder("<EMAIL_ADDRESS_12>") == ("EMAIL_ADDRESS", 12)
    assert parse_placeholder("<PERSON_0>") is None


# -- whole text ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        "<PERSON_1>",
        "PERSON_1",
        "<person_1>",
        "Person_1",
        "pErSoN_1",
        "[PERSON_1]",
        "{PERSON_1}",
        "(PERSON_1)",
        "<PERSON 1>",
        "[person 1]",
        "PERSON 1",
    ],
)
def test_tolerated_forms_are_restored(form: str) -> None:
    assert restore_text(f"Dear {form}, hi.", ZOE) == "Dear Zoe Young, hi."
    assert restore_text(form, ZOE) == "Zoe Young"


@pytest.mark.parametrize(
    "text",
    [
        "<PERSON_2> and <FOO_1> and <EMAIL_ADDRESS_9> stay",
        "XPERSON_1 _PERSON_1 PERSON_1x PERSON_1_ PERSON_12 1PERSON_1 stay",
        "PERSON_01 PERSON_0 PERSON__1 PERSON  1 PERSON-1 PERSON_ 1 stay",
        "EMAIL ADDRESS_1 and EMAIL_ADDRESS1 and EMAILADDRESS_1 stay",
        "a person is not a placeholder, nor is PERSON or <PERSON> or <1>",
        "PER\u017fON_1 (a long s is not an S)",
        "unicode \u00e9\u00df\u4e2d\U0001f600 and <PERSON_9> \r\n\x00 stay byte for byte",
        "",
    ],
)
def test_anything_else_passes_unchanged(text: str) -> None:
    assert restore_text(text, ZOE) == text
    assert find_placeholders(text, ZOE) == []


def test_brackets_are_consumed_only_in_pairs() -> None:
    assert restore_text("<PERSON_1]", ZOE) == "<Zoe Young]"
    assert restore_text("PERSON_1)", ZOE) == "Zoe Young)"
    assert restore_text("<PERSON_1 >", ZOE) == "<Zoe Young >"
    assert restore_text("<<PERSON_1>>", ZOE) == "<Zoe Young>"
    assert restore_text("([PERSON_1])", ZOE) == "(Zoe Young)"


def test_a_bracketed_form_needs_no_word_boundary_before_it() -> None:
    assert restore_text("X<PERSON_1>Y", ZOE) == "XZoe YoungY"
    assert restore_text("X[PERSON_1", ZOE) == "X[Zoe Young"


def test_word_characters_are_ascii_so_scripts_without_spaces_work() -> None:
    assert (
        restore_text("\u8bf7\u8054\u7cfbPERSON_1\u3002", ZOE) == "\u8bf7\u8054\u7cfbZoe Young\u3002"
    )
    assert restore_text("\u00e9PERSON_1\u00e9", ZOE) == "\u00e9Zoe Young\u00e9"
    bank = table(("BANK", "Acme Bank"))
    assert restore_text("BANK_1 bank 1 BAN\u212a_1", bank) == "Acme Bank Acme Bank BAN\u212a_1"


def test_person_1_and_person_12_are_both_restored() -> None:
    text = "<PERSON_1> <PERSON_12> PERSON_1 person 12, [PERSON_13]"
    assert restore_text(text, TWELVE) == "Name1 Name12 Name1 Name12, [PERSON_13]"


def test_types_that_prefix_each_other_are_told_apart() -> None:
    t = table(("EMAIL", "short"), ("EMAIL_ADDRESS", "long"), ("US_SSN", "ssn"))
    assert restore_text("EMAIL_1 EMAIL_ADDRESS_1 <email address_1> US_SSN 1", t) == (
        "short long <email address_1> ssn"
    )


def test_escape_is_applied_to_values_only() -> None:
    t = table(("PERSON", 'Zo"e'))
    assert restore_text("[PERSON_1] x <PERSON_1", t, escape=str.upper) == 'ZO"E x <ZO"E'
    assert restore_text("<PERSON_1>", t, escape=json_escape) == 'Zo\\"e'


def test_find_placeholders_names_the_canonical_forms_in_order() -> None:
    text = "x person_1 <EMAIL_ADDRESS_1> <PERSON_9> [Person 1] XPERSON_1"
    assert find_placeholders(text, ZOE) == ["<PERSON_1>", "<EMAIL_ADDRESS_1>", "<PERSON_1>"]
    assert find_placeholders(text, PlaceholderMap()) == []


def test_restore_spans_point_at_the_values() -> None:
    restored, spans = restore_spans("Hi (PERSON_1], mail <EMAIL_ADDRESS_1>!", ZOE)
    assert restored == "Hi (Zoe Young], mail zoe@acme.com!"
    assert [(restored[a:b], kind) for a, b, kind in spans] == [
        ("Zoe Young", "PERSON"),
        ("zoe@acme.com", "EMAIL_ADDRESS"),
    ]


def test_an_empty_table_restores_nothing() -> None:
    assert restore_text("<PERSON_1>", PlaceholderMap()) == "<PERSON_1>"
    assert restore_spans("<PERSON_1>", PlaceholderMap()) == ("<PERSON_1>", [])


# -- JSON arguments ----------------------------------------------------------------------

_NASTY = 'Zo\u00e9 "Z" O\'Young \\ back\\slash\nnew\tline \u4e2d\U0001f600 \x01 </script>'


def test_json_arguments_stay_valid_json() -> None:
    t = table(("PERSON", _NASTY), ("EMAIL_ADDRESS", "a@b.co"))
    document = {"to": "<PERSON_1>", "note": "ask [person_1] at EMAIL_ADDRESS_1", "n": [1, None]}
    for ensure_ascii in (True, False):
        arguments = json.dumps(document, ensure_ascii=ensure_ascii)
        assert json.loads(restore_json_arguments(arguments, t)) == {
            "to": _NASTY,
            "note": f"ask {_NASTY} at a@b.co",
            "n": [1, None],
        }


def test_json_escape_is_the_inside_of_a_json_string() -> None:
    assert json_escape('a"b\\c\nd\u00e9') == 'a\\"b\\\\c\\nd\u00e9'
    assert json.loads('"' + json_escape(_NASTY) + '"') == _NASTY


_JSON_VALUES = st.text(max_size=15)
_KINDS = st.sampled_from(["PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "EMPLOYEE_ID"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_KINDS, _JSON_VALUES, st.text(max_size=8)), min_size=1, max_size=5))
def test_json_arguments_round_trip(parts: list[tuple[str, str, str]]) -> None:
    """Placeholders inside JSON strings come back as the values, whatever
    characters those contain, and the document still parses."""
    t = PlaceholderMap()
    redacted: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    for i, (kind, value, suffix) in enumerate(parts):
        assume(not find_placeholders(suffix, t))
        placeholder = t.assign(kind, value)
        redacted[f"k{i}"] = [placeholder + " " + suffix, {"v": placeholder}]
        expected[f"k{i}"] = [t.get(placeholder), {"v": t.get(placeholder)}]
        expected[f"k{i}"][0] += " " + suffix
    assert json.loads(restore_json_arguments(json.dumps(redacted), t)) == expected


# -- round trip (hypothesis) -----------------------------------------------------------

_LOOKALIKES = ["PERSON", "person", "_1", " 1", "12", "EMAIL_ADDRESS", "EMPLOYEE_ID_", "<", ">"]
_FILLER = st.lists(
    st.sampled_from(_LOOKALIKES)
    | st.text(alphabet=" .,;:!?\n-'\"\u00e9\u00df\u4e2d0123456789abcXYZ<>[]{}()_", max_size=6),
    max_size=4,
).map("".join)
_VALUES = st.text(min_size=1, max_size=20).filter(str.strip) | st.sampled_from(
    ["<PERSON_1>", "PERSON_2", "<EMAIL_ADDRESS_1", "a<b>c", 'say "hi"', "\u4e2d\u6587"]
)


def _redact(parts: list[tuple[str, str, str]]) -> tuple[PlaceholderMap, list[str], list[str]]:
    """A table, and the fillers and placeholders of the redacted text."""
    t = PlaceholderMap()
    placeholders = [t.assign(kind, value) for _, kind, value in parts]
    return t, [filler for filler, _, _ in parts], placeholders


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_FILLER, _KINDS, _VALUES), min_size=1, max_size=6), _FILLER)
def test_redact_then_restore_is_the_identity(parts: list[tuple[str, str, str]], tail: str) -> None:
    """Canonical ``<TYPE_N>`` placeholders are restored whatever surrounds
    them: their brackets need no word boundary, and a ``<`` or ``>`` is never
    part of a neighbouring match. Values (placeholder look-alikes included)
    are never re-read. So the round trip is exact, save for one case by
    design: filler that itself spells a placeholder of the table (excluded
    here; see the next test for what happens to it)."""
    t, fillers, placeholders = _redact(parts)
    assume(not any(find_placeholders(f, t) for f in [*fillers, tail]))
    redacted = "".join(f + p for f, p in zip(fillers, placeholders, strict=True)) + tail
    original = "".join(f + str(t.get(p)) for f, p in zip(fillers, placeholders, strict=True))
    assert restore_text(redacted, t) == original + tail


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_FILLER, _KINDS, _VALUES), min_size=1, max_size=6), _FILLER)
def test_restoration_is_local_between_canonical_placeholders(
    parts: list[tuple[str, str, str]], tail: str
) -> None:
    """Filler between canonical placeholders is restored as if it stood alone."""
    t, fillers, placeholders = _redact(parts)
    redacted = "".join(f + p for f, p in zip(fillers, placeholders, strict=True)) + tail
    expected = "".join(
        restore_text(f, t) + str(t.get(p)) for f, p in zip(fillers, placeholders, strict=True)
    )
    assert restore_text(redacted, t) == expected + restore_text(tail, t)


_SEPARATORS = st.text(alphabet=" .,;:!?\n-'\"\u00e9\u4e2d", min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_SEPARATORS, _KINDS, _VALUES), min_size=1, max_size=6))
def test_bare_placeholders_between_non_word_characters_round_trip(
    parts: list[tuple[str, str, str]],
) -> None:
    """``TYPE_N`` without brackets, separated by non-word characters other
    than brackets (which would pair up and be consumed), comes back too."""
    t, fillers, placeholders = _redact(parts)
    redacted = "".join(f + p[1:-1] for f, p in zip(fillers, placeholders, strict=True))
    original = "".join(f + str(t.get(p)) for f, p in zip(fillers, placeholders, strict=True))
    assert restore_text(redacted, t) == original


# -- streams ------------------------------------------------------------------------------

_STREAM_TEXT = st.lists(
    st.sampled_from(
        [
            "PERSON",
            "person",
            "EMAIL_ADDRESS",
            "CODE",
            "code_2",
            "_1",
            "_12",
            " 1",
            "<",
            ">",
            "[",
            ")",
        ]
    )
    | st.text(alphabet="<>[]{}()_ PERSONperson0123456789EMAILADDRESabc.,\n\u00e9", max_size=8),
    max_size=12,
).map("".join)


def _could_grow(before: str, held: str, t: PlaceholderMap) -> bool:
    """Independent oracle: ``held`` (after the character ``before``) is a
    prefix of an opening bracket and ``TYPE_N`` of the table, or, after a
    non-word character, of ``TYPE_N`` alone (in any tolerated form)."""

    def prefix_of(text: str, form: str) -> bool:
        return len(text) <= len(form) and all(
            a == b or (a.isascii() and a.upper() == b) for a, b in zip(text, form, strict=False)
        )

    after_word = bool(before) and (before.isascii() and (before.isalnum() or before == "_"))
    for placeholder in t.entries:
        parsed = parse_placeholder(placeholder)
        assert parsed is not None
        for sep in "_ ":
            body = f"{parsed[0]}{sep}{parsed[1]}"
            if any(held[:1] == o and prefix_of(held[1:], body) for o in "<[{("):
                return True
            if held and not after_word and prefix_of(held, body):
                return True
    return False


@settings(max_examples=500, deadline=None)
@given(_STREAM_TEXT, st.lists(st.integers(min_value=0, max_value=120), max_size=15))
def test_a_stream_split_anywhere_restores_like_the_whole(text: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    restorer = StreamRestorer(TWELVE)
    out, seen = [], ""
    for piece in pieces:
        out.append(restorer.feed(piece))
        seen += piece
        held = restorer.held
        assert len(held) <= restorer.max_held
        assert seen.endswith(held)
        before = seen[: len(seen) - len(held)][-1:]
        # held back only while it could still become a placeholder
        assert not held or _could_grow(before, held, TWELVE)
    out.append(restorer.flush())
    assert "".join(out) == restore_text(text, TWELVE)
    assert restorer.held == ""


@settings(max_examples=200, deadline=None)
@given(_STREAM_TEXT)
def test_a_stream_fed_character_by_character_restores_like_the_whole(text: str) -> None:
    assert stream(StreamRestorer(TWELVE), list(text)) == restore_text(text, TWELVE)


def test_every_split_of_a_fixed_text_restores_like_the_whole() -> None:
    text = "Hi <EMAIL_ADDRESS_1>, XPERSON_1 PERSON_1 and [person 1] said <PERSON_12>!PERSON_1"
    expected = restore_text(text, ZOE)
    assert expected == (
        "Hi zoe@acme.com, XPERSON_1 Zoe Young and Zoe Young said <PERSON_12>!Zoe Young"
    )
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            pieces = [text[:i], text[i:j], text[j:]]
            assert stream(StreamRestorer(ZOE), pieces) == expected, (i, j)


def test_partial_placeholders_are_held_never_emitted() -> None:
    restorer = StreamRestorer(ZOE)
    assert restorer.feed("Hello <PER") == "Hello "
    assert restorer.held == "<PER"
    assert restorer.feed("SON_1") == ""
    assert restorer.held == "<PERSON_1"  # a ">" may follow
    assert restorer.feed("> ok") == "Zoe Young ok"
    assert restorer.feed(" EMAIL_ADDR") == " "
    assert restorer.feed("ESS 1") == ""
    assert restorer.flush() == "zoe@acme.com"  # the stream ended: it is whole


def test_a_word_character_before_the_split_is_remembered() -> None:
    restorer = StreamRestorer(ZOE)
    assert restorer.feed("X") == "X"
    assert restorer.feed("PERSON_1") == "PERSON_1"
    assert restorer.flush() == ""


def test_person_1_is_held_until_the_next_character_settles_it() -> None:
    restorer = StreamRestorer(TWELVE)
    assert restorer.feed("PERSON_1") == ""
    assert restorer.feed("2") == ""
    assert restorer.feed("3") == "PERSON_123"
    assert restorer.feed(" PERSON_1") == " "
    assert restorer.feed("2.") == "Name12."


def test_text_that_cannot_become_a_placeholder_is_not_held() -> None:
    restorer = StreamRestorer(ZOE)
    assert restorer.feed("a <PERX") == "a <PERX"
    assert restorer.feed("superson") == "superson"
    assert restorer.feed(" <PERSON_2") == " <PERSON_2"  # no such placeholder
    assert restorer.feed(" <PERSON_0") == " <PERSON_0"
    assert restorer.feed(" [<") == " ["
    assert restorer.held == "<"


def test_max_held_is_the_longest_placeholder_without_its_closing_bracket() -> None:
    restorer = StreamRestorer(ZOE)
    assert restorer.max_held == len("<EMAIL_ADDRESS_1")
    assert restorer.feed("x <EMAIL_ADDRESS_1") == "x "
    assert restorer.held == "<EMAIL_ADDRESS_1"
    assert StreamRestorer(TWELVE).max_held == len("<EMAIL_ADDRESS_1")


def test_an_empty_table_passes_deltas_through() -> None:
    restorer = StreamRestorer(PlaceholderMap())
    delta = "<PER"
    assert restorer.feed(delta) is delta
    assert restorer.held == ""
    assert restorer.flush() == ""
    assert restorer.max_held == 0


def test_the_table_is_read_when_the_restorer_is_made() -> None:
    t = table(("PERSON", "Zoe"))
    restorer = StreamRestorer(t)
    t.assign("PERSON", "Liam")
    assert stream(restorer, ["<PERSON_1> <PERSON_2>"]) == "Zoe <PERSON_2>"


def test_a_restorer_is_as_new_after_flush() -> None:
    restorer = StreamRestorer(ZOE)
    assert stream(restorer, ["aPERSON_1 <PERS"]) == "aPERSON_1 <PERS"
    assert stream(restorer, ["ON_1>"]) == "ON_1>"
    assert stream(restorer, ["PERSON_1"]) == "Zoe Young"


def test_stream_restoration_can_escape_for_json() -> None:
    t = table(("PERSON", 'Zoe "Z"\n\\'))
    document = json.dumps({"to": "<PERSON_1>", "cc": ["PERSON_1"]})
    for size in range(1, len(document) + 1):
        pieces = [document[i : i + size] for i in range(0, len(document), size)]
        out = stream(StreamRestorer(t, escape=json_escape), pieces)
        assert out == restore_json_arguments(document, t)
        assert json.loads(out) == {"to": 'Zoe "Z"\n\\', "cc": ['Zoe "Z"\n\\']}
