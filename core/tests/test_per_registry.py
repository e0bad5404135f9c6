"""veil.metrics.per_registry: one object per registry and factory, released
with its registry."""

from __future__ import annotations

import gc
import weakref

from prometheus_client import CollectorRegistry, Counter

from veil.metrics import per_registry


class _Plugin:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter("plugin_calls", "Calls.", registry=registry)


def test_one_object_per_registry_and_factory_released_with_the_registry() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    made = per_registry(first, _Plugin)
    assert per_registry(first, _Plugin) is made  # registering twice would raise
    assert per_registry(second, _Plugin) is not made
    assert per_registry(first, lambda r: {}) is not made
    gone = weakref.ref(made)
    del first, made
    gc.collect()
    assert gone() is None
