"""A small tokenizer with character offsets, shared by the heuristic recognizers.

Words are runs of letters (any script) with inner apostrophes and hyphens
(``O'Neil``, ``Jean-Luc``); numbers are runs of digits; every other
non-space character is a token of its own; a newline is a token too, so that
recognizers can tell lines apart. Spaces and tabs are not tokens.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["Token", "cue_ends", "tokenize", "words"]

_TOKEN = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*|\d+|\n|[^\w\s]")


class Token:
    """One token: its text, ``[start, end)`` offsets in the analysed text,
    and its shape, computed once (recognizers ask for it many times)."""

    __slots__ = (
        "end",
        "folded",
        "is_capitalized",
        "is_newline",
        "is_number",
        "is_word",
        "start",
        "text",
    )

    def __init__(self, text: str, start: int, end: int) -> None:
        self.text = text
        self.start = start
        self.end = end
        self.folded = text.casefold()
        first = text[0]
        self.is_word = first.isalpha()
        """Letters only (with inner ``'`` or ``-``)."""
        self.is_number = first.isdigit()
        """Digits only."""
        self.is_newline = text == "\n"
        self.is_capitalized = self.is_word and (
            first.isupper() or (len(text) > 2 and text[1] in "'’" and text[2].isupper())
        )
        """A word whose first letter is upper case (``Zoe``, ``ZOE``, ``Ó``),
        also after an elided particle (``d'Ouchy``, ``O'Neil``)."""

    def __repr__(self) -> str:
        return f"Token({self.text!r}, {self.start}, {self.end})"


@lru_cache(maxsize=16)
def _tokenize(text: str) -> tuple[Token, ...]:
    return tuple(Token(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text))


def tokenize(text: str) -> list[Token]:
    """The tokens of ``text`` in order (the recognizers of one analysis
    share the work: recent texts are remembered)."""
    return list(_tokenize(text))


def words(text: str) -> frozenset[str]:
    """The whitespace-separated words of ``text`` (for word lists in code)."""
    return frozenset(text.split())


def cue_ends(cues: re.Pattern[str] | tuple[re.Pattern[str], ...], text: str) -> frozenset[int]:
    """Where the matches of the ``cues`` in ``text`` end (patterns should end
    with ``\\s*``): "is this token right after a cue?" becomes a set lookup,
    one pass over the text per pattern instead of one search per token.
    Matches do not overlap within one pattern: give alternatives that can
    start at the same place as patterns of their own."""
    patterns = cues if isinstance(cues, tuple) else (cues,)
    return frozenset(m.end() for cue in patterns for m in cue.finditer(text))
