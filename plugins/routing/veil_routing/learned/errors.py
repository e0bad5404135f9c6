"""The learned router's exceptions."""

from __future__ import annotations


class ArtifactError(Exception):
    """A router artifact that cannot be used: unreadable, not a router, a
    SHA-256 other than the one the policy pins, or inconsistent contents."""


class DataError(ValueError):
    """Training or evaluation rows that cannot be used; the message says which
    line and how to fix it."""
