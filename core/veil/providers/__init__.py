"""Provider adapters: how the core talks to an upstream model."""

from __future__ import annotations

from .base import Provider

__all__ = ["Provider"]
