"""Putting values back: placeholders in answers and in streamed deltas.

Models copy placeholders faithfully most of the time, and sometimes not
quite. For a placeholder ``<PERSON_1>`` of the table, :func:`restore_text`
accepts ``<PERSON_1>``, ``PERSON_1``, ``<person_1>``, ``Person_1``,
``[PERSON_1]``, ``{PERSON_1}``, ``(PERSON_1)`` and ``<PERSON 1>``:

- the type in any (ASCII) case; an underscore or one space before the number;
- at most one bracket of ``<[{(`` before it and one of ``>]})`` after it;
  they are consumed only when they pair up (``<PERSON_1]`` gives
  ``<Zoe Young]``, ``<<PERSON_1>>`` gives ``<Zoe Young>``);
- without an opening bracket it must start a word, and in every form the
  number must end one: ``XPERSON_1``, ``PERSON_1x`` and ``PERSON_12`` are not
  ``PERSON_1``. Word characters are ASCII letters, digits and ``_``, so
  ``请联系PERSON_1`` is restored (scripts without spaces between words).

Only placeholders of the table are ever matched: anything else, unknown
numbers (``<PERSON_9>``), unknown types (``<FOO_1>``) and leading zeros
(``PERSON_01``) included, passes through unchanged, byte for byte.

:class:`StreamRestorer` does the same on a stream of deltas: whatever the
split, the concatenated output equals :func:`restore_text` of the whole text.
It holds back only a suffix that could still grow into a placeholder of the
table, at most :attr:`StreamRestorer.max_held` characters, and never emits a
partial placeholder.

Inside JSON text (tool-call ``arguments``) restore with ``escape=``
:func:`json_escape`: the tolerated forms contain no character JSON escapes,
so the result stays valid JSON. Known limit there: a bare placeholder right
after an escape sequence (``"...\\nPERSON_1"``) follows the letter ``n`` in
the raw text and is not restored; bracketed forms are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache

from .placeholders import PlaceholderMap, parse_placeholder

__all__ = [
    "StreamRestorer",
    "find_placeholders",
    "json_escape",
    "restore_json_arguments",
    "restore_spans",
    "restore_text",
]

_PAIRS = {"<": ">", "[": "]", "{": "}", "(": ")"}
_SEP = "\x00"  # stands for the separator before the number in the trie: "_" or " "
_FLAGS = re.IGNORECASE | re.ASCII
_NOT_AFTER_WORD = r"(?<![A-Za-z0-9_])"


class _Trie(dict[str, "_Trie"]):
    """Character trie of ``TYPE<SEP>N`` bodies; ``end`` marks a whole body."""

    __slots__ = ("end",)

    def __init__(self) -> None:
        super().__init__()
        self.end = False


def _char(c: str) -> str:
    return "[_ ]" if c == _SEP else re.escape(c)


def _whole(node: _Trie) -> str:
    """Regex for the complete bodies below ``node`` (going on is tried
    before stopping, so ``PERSON_12`` is tried before ``PERSON_1``)."""
    branches = [_char(c) + _whole(child) for c, child in sorted(node.items())]
    if node.end:
        branches.append("")
    if len(branches) == 1:
        return branches[0]
    return "(?:" + "|".join(branches) + ")"


def _prefix(node: _Trie) -> str:
    """Regex for the non-empty prefixes of the bodies below ``node``."""
    branches = [
        _char(c) + (f"(?:{_prefix(child)})?" if child else "") for c, child in sorted(node.items())
    ]
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


class _Patterns:
    """The two regexes for one set of placeholders.

    ``match`` finds the tolerated forms. ``pending`` matches a suffix of the
    text that could still grow into one: an opening bracket followed by a
    (possibly empty) prefix of ``TYPE_N``, or, after a non-word character, a
    non-empty prefix of ``TYPE_N``; the whole ``TYPE_N`` counts as a prefix,
    since the next character decides between ``PERSON_1``, ``PERSON_12`` and
    ``PERSON_1x``, and brings the closing bracket.
    """

    __slots__ = ("match", "max_held", "pending")

    def __init__(self, placeholders: frozenset[str]) -> None:
        root = _Trie()
        for placeholder in placeholders:
            parsed = parse_placeholder(placeholder)
            if parsed is None:  # pragma: no cover - PlaceholderMap only holds canonical ones
                continue
            node = root
            for c in f"{parsed[0]}{_SEP}{parsed[1]}":
                node = node.setdefault(c, _Trie())
            node.end = True
        self.match = re.compile(
            rf"(?:(?P<open>[<\[{{(])|{_NOT_AFTER_WORD})(?P<body>{_whole(root)})"
            r"(?![A-Za-z0-9_])(?P<close>[>\]})])?",
            _FLAGS,
        )
        prefix = _prefix(root)
        self.pending = re.compile(rf"(?:[<\[{{(](?:{prefix})?|{_NOT_AFTER_WORD}{prefix})\Z", _FLAGS)
        # "<" + TYPE + "_" + N: the canonical form without its ">"
        self.max_held = max(map(len, placeholders)) - 1


@lru_cache(maxsize=256)
def _patterns(placeholders: frozenset[str]) -> _Patterns:
    return _Patterns(placeholders)


def _canonical(m: re.Match[str]) -> str:
    return "<" + m["body"].upper().replace(" ", "_") + ">"


def _matches(
    patterns: _Patterns, text: str, start: int = 0, end: int | None = None
) -> Iterator[re.Match[str]]:
    """The placeholders in ``text[start:end]``: ``text[start - 1]`` is seen as
    the character before, and the text is taken to end at ``end``."""
    return patterns.match.finditer(text, start, len(text) if end is None else end)


def _restore(
    patterns: _Patterns,
    values: Mapping[str, str],
    escape: Callable[[str], str] | None,
    text: str,
    start: int = 0,
    end: int | None = None,
) -> str:
    """``text[start:end]`` restored (see :func:`_matches` for the bounds)."""
    stop = len(text) if end is None else end
    out: list[str] = []
    pos = start
    for m in _matches(patterns, text, start, stop):
        value = values[_canonical(m)]
        if escape is not None:
            value = escape(value)
        opener, closer = m["open"] or "", m["close"] or ""
        if opener and closer and _PAIRS[opener] == closer:
            opener = closer = ""
        out += (text[pos : m.start()], opener, value, closer)
        pos = m.end()
    if not out:
        return text[start:stop]
    out.append(text[pos:stop])
    return "".join(out)


def _table_patterns(table: PlaceholderMap) -> _Patterns | None:
    return _patterns(frozenset(table.entries)) if len(table) else None


def restore_text(
    text: str, table: PlaceholderMap, escape: Callable[[str], str] | None = None
) -> str:
    """``text`` with every placeholder of ``table``, in any tolerated form,
    replaced by its value, passed through ``escape`` when given. Everything
    else is returned unchanged."""
    if not text or not len(table):
        return text
    patterns = _table_patterns(table)
    return text if patterns is None else _restore(patterns, table.entries, escape, text)


def restore_spans(text: str, table: PlaceholderMap) -> tuple[str, list[tuple[int, int, str]]]:
    """:func:`restore_text`, and where each restored value now is:
    ``(start, end, entity_type)`` in the restored text, in order."""
    patterns = _table_patterns(table) if text else None
    if patterns is None:
        return text, []
    values = table.entries
    spans: list[tuple[int, int, str]] = []
    out: list[str] = []
    length = pos = 0
    for m in _matches(patterns, text):
        canonical = _canonical(m)
        value = values[canonical]
        opener, closer = m["open"] or "", m["close"] or ""
        if opener and closer and _PAIRS[opener] == closer:
            opener = closer = ""
        before = text[pos : m.start()] + opener
        length += len(before)
        spans.append((length, length + len(value), canonical[1:-1].rpartition("_")[0]))
        length += len(value) + len(closer)
        out += (before, value, closer)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), spans


def json_escape(value: str) -> str:
    """``value`` escaped for the inside of a JSON string (without the quotes)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def restore_json_arguments(arguments: str, table: PlaceholderMap) -> str:
    """Restore in a JSON document kept as text (tool-call ``arguments``):
    values are inserted JSON-escaped, so valid JSON stays valid JSON."""
    return restore_text(arguments, table, json_escape)


def find_placeholders(text: str, table: PlaceholderMap) -> list[str]:
    """The canonical placeholders of ``table`` that occur in ``text``, in any
    tolerated form, in order of appearance, repeats included."""
    patterns = _table_patterns(table) if text else None
    if patterns is None:
        return []
    return [_canonical(m) for m in _matches(patterns, text)]


class StreamRestorer:
    """Restores placeholders in a text that arrives in pieces.

    ``feed(delta)`` returns what can be emitted now, ``flush()`` what is left
    at the end. For any split of a text into deltas, the outputs joined equal
    :func:`restore_text` of the text. The table is read when the restorer is
    made: placeholders added later are not restored by it. Not thread-safe:
    one restorer per streamed field.

    Held back is exactly the shortest suffix of the text so far that could
    still grow into a placeholder of the table (an opening bracket and a
    prefix of ``TYPE_N``, or a prefix of ``TYPE_N`` after a non-word
    character), so at most :attr:`max_held` characters; all text before it is
    emitted at once. A feed costs O(len(delta) + max_held).
    """

    __slots__ = ("_before", "_escape", "_held", "_patterns", "_values")

    def __init__(self, table: PlaceholderMap, escape: Callable[[str], str] | None = None) -> None:
        self._patterns = _table_patterns(table)
        self._values = table.entries
        self._escape = escape
        self._held = ""
        self._before = ""  # the last character emitted, for the whole-word rule

    @property
    def max_held(self) -> int:
        """The most characters ever held back: the length of the table's
        longest placeholder minus one (``<TYPE_N`` without the ``>``, whose
        arrival, or any other next character, settles it); 0 for an empty
        table."""
        return 0 if self._patterns is None else self._patterns.max_held

    @property
    def held(self) -> str:
        """The raw text held back right now."""
        return self._held

    def feed(self, delta: str) -> str:
        """Take the next piece; return the restored text that is final."""
        patterns = self._patterns
        if patterns is None or not delta:
            return delta if patterns is None else ""
        start = len(self._before)
        text = self._before + self._held + delta
        pending = patterns.pending.search(text, max(start, len(text) - patterns.max_held))
        cut = len(text) if pending is None else pending.start()
        # Why restoring text[start:cut] alone is exact: text[cut] is an opening
        # bracket, or a letter after a non-word character. Neither can sit
        # inside a match, so no match crosses the cut. A match ending at the
        # cut ends with a closing bracket or a digit; after a digit, text[cut]
        # must be a bracket (a non-word character, not a closing one), just as
        # the end of the text looks to the regex. What follows is restored
        # with text[cut - 1] as context for the whole-word rule.
        self._held = text[cut:]
        if cut == start:
            return ""
        self._before = text[cut - 1]
        return _restore(patterns, self._values, self._escape, text, start, cut)

    def flush(self) -> str:
        """The restored rest of the text. The restorer is then as new."""
        if self._patterns is None or not self._held:
            self._before = self._held = ""
            return ""
        text = self._before + self._held
        out = _restore(self._patterns, self._values, self._escape, text, len(self._before))
        self._before = self._held = ""
        return out
