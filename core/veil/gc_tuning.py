"""Garbage-collector settings for a serving process.

A gateway process holds a large, long-lived heap (the web stack, pydantic
models, plugins, spaCy's pipeline) and makes a few hundred short-lived
objects per call, nearly all freed by reference counting. With CPython's
defaults the cycle collector runs a young collection every 700 net
allocations and, every few thousand calls, a full collection that walks the
whole long-lived heap: measured on the core-only gateway under 16
connections, about 19 µs per call (9% of its CPU), 0.6 s of every 15 s in
full collections of ~30 ms each.

:func:`settle`, run once the policy's plugins are loaded, collects, freezes
everything alive (``gc.freeze``: later collections skip it) and raises the
young generation's threshold, so collections are rarer and never walk the
start-up heap: the same gateway then spent 176 µs of CPU per call instead of
203 µs. Garbage cycles are still collected; what is frozen is freed by
reference counting as always, only a cycle among frozen objects stays until
:func:`resettle` (run after a policy reload retired the old runtime) thaws,
collects and freezes again.

Only ``veil serve`` (and the multi-worker app factory) turn this on:
in-process gateways, such as the tests', keep the interpreter's defaults.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "resettle", "settle"]

YOUNG_THRESHOLD = 20_000
"""Net allocations between young collections (CPython's default: 700)."""


def settle() -> None:
    """Collect, freeze what is alive, and collect the young generation less
    often (see the module doc). Idempotent."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def resettle() -> None:
    """After a reload: thaw the frozen heap, collect what the retired runtime
    left in cycles, and freeze what is alive again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
