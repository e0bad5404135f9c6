"""Static routing rules, compiled once per policy load.

A rule matches a call when every condition it sets holds: requested model,
team, any key tag, request ``metadata`` values, a regex or keywords on the
text of the last user message. The text is whatever reached this stage: put
``pii`` before ``routing`` in the pipeline so that rules see redacted text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from veil.types import Call

from .settings import RuleSettings
from .strategy import Strategy, parse_strategy

__all__ = ["CompiledRule", "compile_rules", "first_match", "last_user_text"]


def last_user_text(request: Mapping[str, Any]) -> str:
    """The text of the last ``user`` message (text parts joined by spaces);
    ``""`` when there is none."""
    messages = request.get("messages")
    if type(messages) is not list:
        return ""
    for message in reversed(messages):
        if type(message) is dict and message.get("role") == "user":
            content = message.get("content")
            if type(content) is str:
                return content
            if type(content) is list:
                return " ".join(
                    p["text"] for p in content if type(p) is dict and type(p.get("text")) is str
                )
            return ""
    return ""


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule ready to test: sets for membership, one regex for text."""

    label: str
    models: frozenset[str]
    teams: frozenset[str]
    key_tags: frozenset[str]
    metadata: tuple[tuple[str, str], ...]
    text: tuple[re.Pattern[str], ...]
    keywords: tuple[str, ...]
    literal: str | None
    literal_icase: bool
    route: str
    strategy: Strategy | None

    def matches(self, call: Call, model: str, text: str | None) -> bool:
        """Whether ``call`` (asking for ``model``) meets every condition.
        ``text`` is the last user message, or ``None`` if not computed yet
        (then it is read from the request)."""
        if self.models and model not in self.models:
            return False
        principal = call.principal
        if self.teams and principal.team not in self.teams:
            return False
        if self.key_tags and self.key_tags.isdisjoint(principal.tags):
            return False
        if self.metadata:
            meta = call.request.get("metadata")
            if type(meta) is not dict:
                return False
            for key, value in self.metadata:
                if meta.get(key) != value:
                    return False
        if self.text:
            if text is None:
                text = last_user_text(call.request)
            # cheap prefilters: a keyword, and the pattern's leading literal, appear at all
            if self.keywords:
                lowered = text.lower()
                if not any(k in lowered for k in self.keywords):
                    return False
            literal = self.literal
            if literal is not None and literal not in (
                text.lower() if self.literal_icase else text
            ):
                return False
            for pattern in self.text:
                if pattern.search(text) is None:
                    return False
        return True


def _text_patterns(rule: RuleSettings) -> tuple[re.Pattern[str], ...]:
    """The rule's regex and its keywords (whole words, any case) as one regex;
    when both are given, both must match."""
    out = []
    if rule.pattern is not None:
        out.append(re.compile(rule.pattern))
    if rule.keywords:
        words = "|".join(re.escape(k) for k in sorted(rule.keywords, key=len, reverse=True))
        out.append(re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE))
    return tuple(out)


_LEADING_LITERAL = re.compile(r"^(\(\?i\))?(?:\\b)?([A-Za-z0-9 _:,;=<>@#%&'\"/-]{3,})")


def leading_literal(pattern: str) -> tuple[str | None, bool]:
    """A string every match of ``pattern`` must contain (its leading literal
    characters), and whether to compare it case-insensitively; ``(None,
    False)`` when no such string is certain (alternation, too short)."""
    if "|" in pattern:
        return None, False
    m = _LEADING_LITERAL.match(pattern)
    if m is None:
        return None, False
    literal = m.group(2)
    nxt = pattern[m.end() : m.end() + 1]
    if nxt and nxt in "*?{":
        literal = literal[:-1]  # the last character is optional or repeated
    if len(literal) < 3:
        return None, False
    icase = m.group(1) is not None
    return (literal.lower() if icase else literal), icase


def compile_rules(rules: Sequence[RuleSettings]) -> tuple[CompiledRule, ...]:
    """Compile the policy's rules, in order."""
    out = []
    for i, r in enumerate(rules):
        out.append(
            CompiledRule(
                label=r.id or f"rule{i + 1}",
                models=frozenset(r.models),
                teams=frozenset(r.teams),
                key_tags=frozenset(r.key_tags),
                metadata=tuple(sorted(r.metadata.items())),
                text=_text_patterns(r),
                keywords=tuple(k.lower() for k in r.keywords),
                literal=leading_literal(r.pattern)[0] if r.pattern else None,
                literal_icase=leading_literal(r.pattern)[1] if r.pattern else False,
                route=r.route,
                strategy=parse_strategy(r.strategy) if r.strategy else None,
            )
        )
    return tuple(out)


def first_match(rules: Sequence[CompiledRule], call: Call, model: str) -> CompiledRule | None:
    """The first rule ``call`` matches, or ``None``. The last user message is
    extracted at most once."""
    text: str | None = None
    for rule in rules:
        if rule.text and text is None:
            text = last_user_text(call.request)
        if rule.matches(call, model, text):
            return rule
    return None
