"""Putting values back: placeholders in answers and in streamed deltas.

Models copy placeholders faithfully most of the time, and sometimes not
quite. :func:`restore_text` accepts, for a placeholder ``<PERSON_1>`` of the
table: ``<PERSON_1>``, ``PERSON_1``, ``<person_1>``, ``Person_1``,
``[PERSON_1]``, ``{PERSON_1}``, ``(PERSON_1)`` and ``<PERSON 1>``. A bare
form must be a whole word (``XPERSON_1`` and ``PERSON_12`` are not
``PERSON_1``); brackets are consumed only when they pair up. Anything that is
not a placeholder of the table, including unknown numbers and types, passes
through unchanged, byte for byte.

:class:`StreamRestorer` does the same on a stream of deltas: whatever the
split, the concatenated output equals :func:`restore_text` of the whole text.
It holds back only a suffix that could still grow into a placeholder of the
table (at most :attr:`StreamRestorer.max_held` characters) and never emits a
partial placeholder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache

from .placeholders import PlaceholderMap

__all__ = [
    "StreamRestorer",
    "find_placeholders",
    "json_escape",
    "restore_json_arguments",
    "restore_spans",
    "restore_text",
]

Escape = Callable[[str], str]
_OPENERS = "<[{("
_PAIRS = {"<": ">", "[": "]", "{": "}", "(": ")"}
_WORD = re.compile(r"[A-Za-z0-9_]")


@lru_cache(maxsize=512)
def _pattern(types: frozenset[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(t) for t in sorted(types, key=len, reverse=True))
    return re.compile(
        r"(?:(?P<open>[<\[{(])|(?<![A-Za-z0-9_]))"
        rf"(?P<type>{alternatives})[_ ](?P<num>[0-9]+)(?![A-Za-z0-9_])"
        r"(?P<close>[>\]})])?",
        re.IGNORECASE,
    )


def json_escape(value: str) -> str:
    """``value`` escaped for the inside of a JSON string (no quotes around)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def _replace(table: PlaceholderMap, escape: Escape | None) -> Callable[[re.Match[str]], str]:
    def replace(m: re.Match[str]) -> str:
        value = table.lookup(m["type"].upper(), int(m["num"]))
        if value is None:
            return m.group()
        if escape is not None:
            value = escape(value)
        opener, closer = m["open"] or "", m["close"] or ""
        if opener and closer and _PAIRS[opener] == closer:
            return value
        return opener + value + closer

    return replace


def restore_text(text: str, table: PlaceholderMap, escape: Escape | None = None) -> str:
    """``text`` with every placeholder of ``table`` replaced by its value
    (passed through ``escape`` when given)."""
    if not len(table) or not text:
        return text
    return _pattern(table.types).sub(_replace(table, escape), text)


def restore_spans(text: str, table: PlaceholderMap) -> tuple[str, list[tuple[int, int, str]]]:
    """:func:`restore_text`, and where each restored value now is:
    ``(start, end, entity_type)`` in the restored text."""
    if not len(table) or not text:
        return text, []
    spans: list[tuple[int, int, str]] = []
    out: list[str] = []
    pos = 0
    length = 0
    replace = _replace(table, None)
    for m in _pattern(table.types).finditer(text):
        before = text[pos : m.start()]
        out.append(before)
        length += len(before)
        replacement = replace(m)
        value = table.lookup(m["type"].upper(), int(m["num"]))
        if value is not None:
            offset = replacement.find(value)
            spans.append((length + offset, length + offset + len(value), m["type"].upper()))
        out.append(replacement)
        length += len(replacement)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), spans


def restore_json_arguments(arguments: str, table: PlaceholderMap) -> str:
    """Restore inside a JSON document kept as text (tool-call ``arguments``):
    values are JSON-escaped, so the result stays valid JSON."""
    return restore_text(arguments, table, json_escape)


def find_placeholders(text: str, table: PlaceholderMap) -> list[str]:
    """The canonical placeholders of ``table`` that occur in ``text`` (in any
    tolerated form), in order of appearance."""
    if not len(table):
        return []
    found = []
    for m in _pattern(table.types).finditer(text):
        canonical = f"<{m['type'].upper()}_{int(m['num'])}>"
        if canonical in table:
            found.append(canonical)
    return found


class StreamRestorer:
    """Restores placeholders in a text that arrives in pieces.

    ``feed(delta)`` returns what can be emitted now; ``flush()`` what is left
    at the end. Not thread-safe: one per streamed field.
    """

    __slots__ = ("_digits", "_escape", "_held", "_table", "_types", "max_held")

    def __init__(self, table: PlaceholderMap, escape: Escape | None = None) -> None:
        self._table = table
        self._escape = escape
        self._held = ""
        digits: dict[str, int] = {}
        for placeholder in table.entries:
            kind, _, number = placeholder[1:-1].rpartition("_")
            digits[kind] = max(digits.get(kind, 0), len(number))
        self._digits = digits
        self._types = sorted(digits)
        longest = max((len(t) + 1 + d for t, d in digits.items()), default=0)
        self.max_held = 2 + longest if digits else 0
        """The longest suffix ever held back: two brackets and the longest
        ``TYPE_N`` of the table (0 for an empty table)."""

    @property
    def held(self) -> str:
        """The text held back right now."""
        return self._held

    def feed(self, delta: str) -> str:
        """Take the next piece; return the restored text that is final."""
        if not self._types:
            return delta
        buffer = self._held + delta
        cut = len(buffer)
        for p in range(max(0, len(buffer) - self.max_held), len(buffer)):
            if self._viable(buffer, p):
                cut = p
                break
        self._held = buffer[cut:]
        return restore_text(buffer[:cut], self._table, self._escape)

    def flush(self) -> str:
        """The restored rest; the restorer is empty afterwards."""
        rest, self._held = self._held, ""
        return restore_text(rest, self._table, self._escape)

    def _viable(self, buffer: str, p: int) -> bool:
        """Could ``buffer[p:]`` still grow into a placeholder of the table?"""
        j, openers = p, 0
        while j < len(buffer) and buffer[j] in _OPENERS and openers < 2:
            j += 1
            openers += 1
        if not openers and p > 0 and _WORD.match(buffer[p - 1]):
            return False
        rest = buffer[j:].upper()
        if not rest:
            return openers > 0
        if not rest[0].isalpha():
            return False
        for kind in self._types:
            if len(rest) <= len(kind):
                if kind.startswith(rest):
                    return True
                continue
            if not rest.startswith(kind) or rest[len(kind)] not in "_ ":
                continue
            number = rest[len(kind) + 1 :]
            if len(number) <= self._digits[kind] and (not number or number.isdigit()):
                return True
        return False
