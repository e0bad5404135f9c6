"""Strategies over a model pool: which model a call gets, given predicted qualities
and costs. Pure functions, testable without a gateway or a router.

A strategy sets a bar; the cheapest pool model whose predicted quality clears it
wins. ``quality``, ``balanced`` and ``cost`` set the bar relative to the best
predicted quality for the prompt (the policy's ``[routing.bars]``: 1.0, 0.9 and
0.75 by default); ``floor:X`` sets it to the absolute predicted quality ``X``
(0..1). When no model clears a floor, the best predicted model is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["NAMED", "PoolChoice", "Strategy", "choose", "parse_strategy"]

NAMED = ("quality", "balanced", "cost")
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Strategy:
    """A named strategy (``floor`` is ``None``) or an explicit quality floor."""

    name: str
    floor: float | None = None

    @property
    def label(self) -> str:
        """How ``x-veil-route`` and audit records name it."""
        return f"floor:{self.floor:g}" if self.floor is not None else self.name


def parse_strategy(value: str) -> Strategy:
    """Parse ``quality``, ``balanced``, ``cost``, or a floor written ``floor:0.7``,
    ``floor=0.7`` or ``0.7`` (case and surrounding spaces ignored).

    :raises ValueError: saying which forms are accepted.
    """
    text = value.strip().lower()
    if text in NAMED:
        return Strategy(text)
    number = text
    for prefix in ("floor:", "floor="):
        if text.startswith(prefix):
            number = text[len(prefix) :].strip()
            break
    try:
        floor = float(number)
    except ValueError:
        floor = math.nan
    if not 0.0 <= floor <= 1.0:  # also false for nan
        raise ValueError(
            f"unknown routing strategy {value[:40]!r}: use quality, balanced, cost, or a "
            "quality floor between 0 and 1 such as floor:0.7"
        )
    return Strategy("floor", floor)


@dataclass(frozen=True, slots=True)
class PoolChoice:
    """The chosen model, the failover order of the pool's models (chosen first),
    the chosen model's predicted quality, the bar, and whether any model cleared it."""

    model: str
    order: tuple[str, ...]
    quality: float
    bar: float
    cleared: bool


def choose(
    models: Sequence[str],
    predicted: Mapping[str, float],
    costs: Mapping[str, float],
    strategy: Strategy,
    relative_bar: float,
) -> PoolChoice:
    """Pick the cheapest of ``models`` whose predicted quality clears the bar.

    :param predicted: predicted quality 0..1 per model (every model present).
    :param costs: estimated cost per model (any unit, same for all).
    :param relative_bar: the named strategy's share of the best prediction
        (ignored for a floor).
    :returns: the choice; the failover order lists the other models that clear
        the bar by cost, then the rest by predicted quality, best first.
    """
    best = max(predicted[m] for m in models)
    bar = strategy.floor if strategy.floor is not None else best * relative_bar
    clears = sorted(
        (m for m in models if predicted[m] >= bar - _EPS), key=lambda m: (costs[m], -predicted[m])
    )
    rest = sorted((m for m in models if m not in clears), key=lambda m: -predicted[m])
    cleared = bool(clears)
    order = clears + rest
    return PoolChoice(order[0], tuple(order), predicted[order[0]], bar, cleared)
