"""veil-wordguard: refuse chat calls that contain a term the policy blocks.

This module holds the plugin's hook implementations only; the logic lives in
:mod:`veil_wordguard.guard` and :mod:`veil_wordguard.stage`.
"""

from __future__ import annotations

from collections.abc import Callable

from veil import Stage, hookimpl

from .guard import WordGuardSettings
from .stage import WordGuardStage

__all__ = ["__version__", "veil_register_stages", "veil_settings_model"]

__version__ = "0.1.0"


@hookimpl
def veil_settings_model() -> type[WordGuardSettings]:
    """The ``[wordguard]`` section is validated by :class:`WordGuardSettings`."""
    return WordGuardSettings


@hookimpl
def veil_register_stages(register: Callable[[Stage], None], settings: WordGuardSettings) -> None:
    """Register the ``wordguard`` stage, built from this policy's settings."""
    register(WordGuardStage(settings))
