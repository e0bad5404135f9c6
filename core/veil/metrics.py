"""Prometheus metrics of one gateway process.

Labels hold only bounded values the policy defines (route, deployment names,
status codes, error kinds), never request text or user-supplied strings.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "per_registry"]

T = TypeVar("T")

_made: weakref.WeakKeyDictionary[CollectorRegistry, dict[Any, Any]] = weakref.WeakKeyDictionary()
_made_lock = threading.Lock()


def per_registry(registry: CollectorRegistry, factory: Callable[[CollectorRegistry], T]) -> T:
    """The one ``factory(registry)`` made for ``registry``, made on first use.

    A gateway keeps its registry across policy reloads, so a plugin's metrics
    (which a registry accepts only once) are made here once per gateway and
    reused by every later policy load; they go when the registry goes.
    ``factory`` is the key: call it with the same class or function each time.
    """
    with _made_lock:
        made = _made.setdefault(registry, {})
        if factory not in made:
            made[factory] = factory(registry)
        return made[factory]  # type: ignore[no-any-return]


_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class Metrics:
    """The gateway's metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "veil_requests",
            "Requests served, by endpoint, deployment and HTTP status.",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "veil_request_duration_seconds",
            "Total time to answer (to the last byte for streams), by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "veil_gateway_overhead_seconds",
            "Time spent in the gateway itself (total minus upstream time), by endpoint.",
            ["endpoint"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            "veil_upstream_duration_seconds",
            "Time waiting for the upstream (to the last byte for streams), by deployment.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "veil_upstream_errors",
            "Failed upstream attempts, by deployment and kind.",
            ["model", "kind"],
            registry=r,
        )
        self.stage_failures = Counter(
            "veil_stage_failures",
            "Stage failures, by stage and hook.",
            ["stage"],
            registry=r,
        )
        self.policy_version = Gauge(
            "veil_policy_version", "Version of the policy in force.", registry=r
        )
        self.policy_reloads = Counter(
            "veil_policy_reloads",
            "Policy reload attempts, by result (accepted, refused).",
            ["result"],
            registry=r,
        )
        self.inflight = Gauge("veil_requests_in_flight", "Calls being served.", registry=r)
        self._req_children: dict[tuple[str, str, int], Counter] = {}
        self._dur = {e: self.duration.labels(e) for e in ("chat", "embeddings")}
        self._ovh = {e: self.overhead.labels(e) for e in ("chat", "embeddings")}
        self._up: dict[str, Histogram] = {}

    def observe(
        self, endpoint: str, model: str, status: int, total: float, upstream: float
    ) -> None:
        """Record one finished call (cached label children: this is the hot path)."""
        key = (endpoint, model, status)
        child = self._req_children.get(key)
        if child is None:
            child = self._req_children[key] = self.requests.labels(endpoint, model, str(status))
        child.inc()
        self._dur[endpoint].observe(total)
        self._ovh[endpoint].observe(max(0.0, total - upstream))
        if upstream and model:
            up = self._up.get(model)
            if up is None:
                up = self._up[model] = self.upstream.labels(model)
            up.observe(upstream)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
