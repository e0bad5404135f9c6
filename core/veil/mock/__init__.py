"""A deterministic OpenAI-compatible model, used in-process by the ``mock``
provider and over HTTP by ``veil mock-upstream``."""

from __future__ import annotations

from .engine import MockModel

__all__ = ["MockModel"]
