"""Typed, numbered placeholders and the table that maps them back to values.

A placeholder is ``<TYPE_N>``: the entity type in capitals (``PERSON``,
``EMAIL_ADDRESS``, a custom type such as ``EMPLOYEE_ID``) and a number that
starts at 1 for each type. Within one table the same value always gets the
same placeholder and different values different numbers. "Same value" is
decided by :func:`value_key`: case and runs of whitespace do not matter, so
"Zoe Young" and "zoe  young" share ``<PERSON_1>``; the table keeps the form
it saw first, which is what restoration puts back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

__all__ = ["ENTITY_TYPE", "PlaceholderMap", "format_placeholder", "parse_placeholder", "value_key"]

ENTITY_TYPE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
"""What an entity type may look like: capitals, digits and single underscores."""

_CANONICAL = re.compile(r"<(" + ENTITY_TYPE.pattern + r")_([1-9][0-9]*)>")


def format_placeholder(entity_type: str, number: int) -> str:
    """``<TYPE_N>``. ``number`` starts at 1."""
    return f"<{entity_type}_{number}>"


def parse_placeholder(placeholder: str) -> tuple[str, int] | None:
    """``("TYPE", N)`` for a canonical ``<TYPE_N>``, else ``None``."""
    match = _CANONICAL.fullmatch(placeholder)
    return (match[1], int(match[2])) if match else None


def value_key(entity_type: str, value: str) -> str:
    """The identity of a value within a table: its type, and the value with
    case folded and whitespace runs collapsed."""
    return entity_type + "\x00" + " ".join(value.split()).casefold()


class PlaceholderMap:
    """Placeholder <-> value table for one call or one conversation.

    Not thread-safe; a call uses its own table on the event loop.
    ``entries`` (placeholder -> value) is what a vault persists; a table
    rebuilt from it numbers new values after the highest number it holds.
    """

    __slots__ = ("_by_key", "_counters", "_values")

    def __init__(self, entries: Mapping[str, str] | None = None) -> None:
        self._values: dict[str, str] = {}
        self._by_key: dict[str, str] = {}
        self._counters: dict[str, int] = {}
        for placeholder, value in (entries or {}).items():
            self.add(placeholder, value)

    def add(self, placeholder: str, value: str) -> None:
        """Record an existing assignment (e.g. loaded from a vault).

        :raises ValueError: ``placeholder`` is not canonical ``<TYPE_N>``.
        """
        parsed = parse_placeholder(placeholder)
        if parsed is None:
            raise ValueError(f"not a placeholder: {placeholder!r}")
        entity_type, number = parsed
        self._values[placeholder] = value
        self._by_key.setdefault(value_key(entity_type, value), placeholder)
        if number > self._counters.get(entity_type, 0):
            self._counters[entity_type] = number

    def assign(self, entity_type: str, value: str) -> str:
        """The placeholder of ``value``: the existing one, or the next number."""
        key = value_key(entity_type, value)
        found = self._by_key.get(key)
        if found is not None:
            return found
        number = self._counters.get(entity_type, 0) + 1
        placeholder = format_placeholder(entity_type, number)
        self._counters[entity_type] = number
        self._values[placeholder] = value
        self._by_key[key] = placeholder
        return placeholder

    def find(self, entity_type: str, value: str) -> str | None:
        """The placeholder already given to ``value``, or ``None``."""
        return self._by_key.get(value_key(entity_type, value))

    def get(self, placeholder: str) -> str | None:
        """The value behind a canonical placeholder, or ``None``."""
        return self._values.get(placeholder)

    def lookup(self, entity_type: str, number: int) -> str | None:
        """The value behind ``<entity_type_number>``, or ``None``."""
        return self._values.get(format_placeholder(entity_type, number))

    @property
    def entries(self) -> dict[str, str]:
        """A copy of the table: placeholder -> value."""
        return dict(self._values)

    @property
    def types(self) -> frozenset[str]:
        """The entity types that have at least one placeholder."""
        return frozenset(self._counters)

    def longest(self) -> int:
        """Length of the longest placeholder in the table (0 when empty)."""
        return max(map(len, self._values), default=0)

    def values(self) -> Iterator[str]:
        """The values in the table (for output scanning: what the caller sent)."""
        return iter(self._values.values())

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, placeholder: object) -> bool:
        return placeholder in self._values
