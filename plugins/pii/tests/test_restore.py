"""Placeholders back into text: whole answers and streams split anywhere."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from veil_pii.placeholders import PlaceholderMap, parse_placeholder, value_key
from veil_pii.restore import (
    StreamRestorer,
    find_placeholders,
    restore_json_arguments,
    restore_text,
)


def table(**values: str) -> PlaceholderMap:
    t = PlaceholderMap()
    for key, value in values.items():
        t.assign(key.rstrip("0123456789").rstrip("_"), value)
    return t


ZOE = table(PERSON="Zoe Young", EMAIL_ADDRESS="zoe@acme.com")


# -- placeholders ----------------------------------------------------------------------


def test_same_value_same_placeholder_and_numbers_per_type() -> None:
    t = PlaceholderMap()
    assert t.assign("PERSON", "Zoe Young") == "<PERSON_1>"
    assert t.assign("PERSON", "zoe  young") == "<PERSON_1>"
    assert t.assign("PERSON", "Liam") == "<PERSON_2>"
    assert t.assign("EMAIL_ADDRESS", "a@b.co") == "<EMAIL_ADDRESS_1>"
    assert t.get("<PERSON_1>") == "Zoe Young"
    rebuilt = PlaceholderMap(t.entries)
    assert rebuilt.assign("PERSON", "Noah") == "<PERSON_3>"
    assert parse_placeholder("<EMAIL_ADDRESS_12>") == ("EMAIL_ADDRESS", 12)
    assert parse_placeholder("<PERSON_0>") is None
    assert value_key("PERSON", "A  b") == value_key("PERSON", "a b")


# -- whole text --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        "<PERSON_1>",
        "PERSON_1",
        "<person_1>",
        "Person_1",
        "[PERSON_1]",
        "{PERSON_1}",
        "(PERSON_1)",
        "<PERSON 1>",
    ],
)
def test_tolerated_forms_are_restored(form: str) -> None:
    assert restore_text(f"Dear {form}, hi.", ZOE) == "Dear Zoe Young, hi."


@pytest.mark.parametrize(
    "text",
    [
        "<PERSON_2> and <FOO_1> stay",
        "XPERSON_1 and PERSON_12 and PERSON_1x stay",
        "a person is not a placeholder",
        "<PERSON>",
        "",
    ],
)
def test_anything_else_passes_unchanged(text: str) -> None:
    assert restore_text(text, ZOE) == text


def test_unpaired_brackets_are_kept() -> None:
    assert restore_text("<PERSON_1]", ZOE) == "<Zoe Young]"
    assert restore_text("<<PERSON_1>>", ZOE) == "<Zoe Young>"


def test_person_1_and_person_12_are_both_restored() -> None:
    t = PlaceholderMap()
    for i in range(12):
        t.assign("PERSON", f"Name{i + 1}")
    assert restore_text("<PERSON_1> <PERSON_12> PERSON_1", t) == "Name1 Name12 Name1"


def test_json_arguments_stay_valid_json() -> None:
    t = table(PERSON='Zoé "Z" O\'Young\\\n')
    arguments = json.dumps({"to": "<PERSON_1>", "note": "ask PERSON_1 twice: <PERSON_1>"})
    restored = json.loads(restore_json_arguments(arguments, t))
    value = 'Zoé "Z" O\'Young\\\n'
    assert restored == {"to": value, "note": f"ask {value} twice: {value}"}


def test_find_placeholders_names_the_canonical_forms() -> None:
    assert find_placeholders("x person_1 <EMAIL_ADDRESS_1> <PERSON_9>", ZOE) == [
        "<PERSON_1>",
        "<EMAIL_ADDRESS_1>",
    ]


# -- round trip (hypothesis) -----------------------------------------------------------

_TYPES = st.sampled_from(["PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "EMPLOYEE_ID"])
_VALUES = st.text(min_size=1, max_size=20).filter(lambda v: v.strip())
_FILLER = st.text(alphabet=" .,;:!?\n-'\"éß中0123456789abcXYZ<>[]_", max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_FILLER, _TYPES, _VALUES), min_size=1, max_size=6), _FILLER)
def test_redact_then_restore_is_the_identity(parts: list[tuple[str, str, str]], tail: str) -> None:
    """Text built from filler and values (which may contain anything,
    placeholder look-alikes included): put placeholders where the values
    are, restore, get the text back. The one exception, by design: filler
    that itself spells a placeholder of the table is restored too."""
    t = PlaceholderMap()
    original, redacted = [], []
    for filler, kind, value in parts:
        placeholder = t.assign(kind, value)
        first = t.get(placeholder)
        assert first is not None
        original += [filler, first]
        redacted += [filler, placeholder]
    fillers = [filler for filler, _, _ in parts] + [tail]
    assume(not any(find_placeholders(f, t) for f in fillers))
    assert restore_text("".join(redacted) + tail, t) == "".join(original) + tail


_STREAM_TEXT = st.text(alphabet="<>[]{}()_ PERSONperson0123456789EMAILADDRESabc.,\n", max_size=80)


@settings(max_examples=400, deadline=None)
@given(_STREAM_TEXT, st.lists(st.integers(min_value=0, max_value=80), max_size=12))
def test_a_stream_split_anywhere_restores_like_the_whole(text: str, cuts: list[int]) -> None:
    t = PlaceholderMap()
    for i in range(12):
        t.assign("PERSON", f"P{i}")
    t.assign("EMAIL_ADDRESS", "e@x.io")
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    restorer = StreamRestorer(t)
    out = []
    for piece in pieces:
        out.append(restorer.feed(piece))
        assert len(restorer.held) <= restorer.max_held
    out.append(restorer.flush())
    assert "".join(out) == restore_text(text, t)


def test_every_split_of_a_placeholder_restores_it() -> None:
    text = "Hi <EMAIL_ADDRESS_1>, PERSON_1 and [person 1] said <PERSON_12>!"
    t = PlaceholderMap()
    t.assign("EMAIL_ADDRESS", "zoe@acme.com")
    t.assign("PERSON", "Zoe Young")
    expected = restore_text(text, t)
    assert expected == "Hi zoe@acme.com, Zoe Young and Zoe Young said <PERSON_12>!"
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            restorer = StreamRestorer(t)
            out = restorer.feed(text[:i]) + restorer.feed(text[i:j]) + restorer.feed(text[j:])
            assert out + restorer.flush() == expected


def test_partial_placeholders_are_held_never_emitted() -> None:
    restorer = StreamRestorer(ZOE)
    assert restorer.feed("Hello <PER") == "Hello "
    assert restorer.held == "<PER"
    assert restorer.feed("SON_1> ok") == "Zoe Young ok"
    assert restorer.feed(" <EMAIL_ADDR") == " "
    assert restorer.feed("ESS_1") == ""
    assert restorer.flush() == "<zoe@acme.com"  # the stream ended before its ">"


def test_text_that_cannot_become_a_placeholder_is_not_held() -> None:
    restorer = StreamRestorer(ZOE)
    assert restorer.feed("a <PERX") == "a <PERX"
    assert restorer.feed("superson") == "superson"
    assert restorer.held == ""


def test_an_empty_table_passes_deltas_through() -> None:
    restorer = StreamRestorer(PlaceholderMap())
    assert restorer.feed("<PER") == "<PER"
    assert restorer.max_held == 0


def test_stream_restoration_can_escape_for_json() -> None:
    from veil_pii.restore import json_escape

    t = table(PERSON='Zoe "Z"')
    restorer = StreamRestorer(t, escape=json_escape)
    out = restorer.feed('{"to": "<PERS') + restorer.feed('ON_1>"}') + restorer.flush()
    assert json.loads(out) == {"to": 'Zoe "Z"'}


@settings(max_examples=200, deadline=None)
@given(_STREAM_TEXT)
def test_restore_spans_point_at_the_restored_values(text: str) -> None:
    from veil_pii.restore import restore_spans

    t = PlaceholderMap()
    for i in range(12):
        t.assign("PERSON", f"Name {i}")
    t.assign("EMAIL_ADDRESS", "e@x.io")
    restored, spans = restore_spans(text, t)
    assert restored == restore_text(text, t)
    for start, end, kind in spans:
        assert t.find(kind, restored[start:end]) is not None
