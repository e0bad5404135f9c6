"""The word guard's logic: settings, matching, and finding the text to check.

Nothing here needs a running gateway: :class:`WordGuard` counts blocked
terms in a string or in an OpenAI chat request body, and
:class:`WordGuardSettings` validates the policy's ``[wordguard]`` section.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["CHECKED_ROLES", "WordGuard", "WordGuardSettings", "compile_terms", "texts_to_check"]

CHECKED_ROLES = frozenset({"system", "developer", "user"})
"""The message roles whose text is checked. ``developer`` is OpenAI's newer
name for ``system``; assistant and tool messages are not checked."""


class WordGuardSettings(BaseModel):
    """The policy's ``[wordguard]`` section.

    :param blocked: terms to refuse: words or short phrases, matched whole
        and case-insensitively. Empty (the default): nothing is refused.
    :param header: add ``x-wordguard: checked`` to every response the guard
        let through.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    blocked: list[str] = []
    header: bool = True

    @field_validator("blocked")
    @classmethod
    def _no_blank_terms(cls, terms: list[str]) -> list[str]:
        """Refuse blank entries; strip surrounding whitespace from the others."""
        for i, term in enumerate(terms):
            if not term.strip():
                raise ValueError(f"entry {i} is blank; remove it or write the term")
        return [term.strip() for term in terms]


def compile_terms(terms: Iterable[str]) -> re.Pattern[str] | None:
    """One pattern matching any of ``terms`` as a whole word, or ``None``.

    Terms are case-folded (the text must be too, see :meth:`WordGuard.count`);
    the whitespace inside a phrase matches any run of whitespace. "Whole word"
    means no letter, digit or underscore right before or after the match, so
    ``ban`` matches "ban!" but not "banana" or "unban".
    """
    folded = {" ".join(t.casefold().split()) for t in terms}
    folded.discard("")
    if not folded:
        return None
    # Longest first, so that a phrase wins over a word it starts with.
    alternatives = (
        r"\s+".join(re.escape(w) for w in term.split())
        for term in sorted(folded, key=lambda t: (-len(t), t))
    )
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)")


def texts_to_check(request: Mapping[str, Any]) -> Iterator[str]:
    """The text of the request's system, developer and user messages.

    Yields string ``content`` and the ``text`` of ``{"type": "text"}``
    content parts; skips anything else (images, audio, malformed entries:
    the core validates the request's shape before stages run).
    """
    messages = request.get("messages")
    if not isinstance(messages, list):
        return
    for message in messages:
        if not isinstance(message, Mapping) or message.get("role") not in CHECKED_ROLES:
            continue
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if (
                    isinstance(part, Mapping)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    yield part["text"]


class WordGuard:
    """Counts blocked terms. Build once per policy load; cheap to call."""

    __slots__ = ("pattern",)

    def __init__(self, blocked: Iterable[str]) -> None:
        self.pattern = compile_terms(blocked)

    def count(self, text: str) -> int:
        """How many times a blocked term occurs in ``text``."""
        if self.pattern is None or not text:
            return 0
        return sum(1 for _ in self.pattern.finditer(text.casefold()))

    def count_request(self, request: Mapping[str, Any]) -> int:
        """How many times a blocked term occurs in a chat request's checked text."""
        if self.pattern is None:
            return 0
        return sum(self.count(text) for text in texts_to_check(request))
