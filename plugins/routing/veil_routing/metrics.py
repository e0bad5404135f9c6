"""The plugin's Prometheus metrics, in the gateway's registry (``/metrics``).

Registered once per registry: policy reloads reuse them. Labels are policy
names only (deployments, strategies, states), never request text.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter

from veil.metrics import per_registry

from .breaker import STATE_VALUE, Breaker

__all__ = ["RoutingMetrics"]


class RoutingMetrics:
    """``veil_routing_breaker_state{deployment}`` (0 closed, 1 half-open, 2 open),
    ``veil_routing_breaker_transitions_total{deployment, state}`` (the state
    entered) and ``veil_routing_pool_choices_total{pool, model, strategy}``.

    One per gateway (its registry), so it also keeps what must outlive a
    policy reload: ``breakers``, the carried memory of
    :class:`~veil_routing.breaker.BreakerBoard`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.breakers: dict[Hashable, Breaker] = {}
        self.breaker_state = Gauge(
            "veil_routing_breaker_state",
            "Circuit breaker state per deployment: 0 closed, 1 half-open, 2 open.",
            ["deployment"],
            registry=registry,
        )
        self.breaker_transitions = PromCounter(
            "veil_routing_breaker_transitions",
            "Circuit breaker transitions, by deployment and state entered.",
            ["deployment", "state"],
            registry=registry,
        )
        self.pool_choices = PromCounter(
            "veil_routing_pool_choices",
            "Models chosen by a pool strategy, by pool, model and strategy kind.",
            ["pool", "model", "strategy"],
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: Any) -> RoutingMetrics:
        """The metrics of ``registry``, created on first use (once per gateway)."""
        return per_registry(registry, cls)

    def transition(self, deployment: str, old: str, new: str) -> None:
        """Record a breaker moving to ``new``."""
        self.breaker_state.labels(deployment).set(STATE_VALUE[new])
        self.breaker_transitions.labels(deployment, new).inc()
