"""The plugin's Prometheus metrics, in the gateway's registry (``/metrics``).

Registered once per registry: policy reloads reuse them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from veil.metrics import per_registry

from .store import NANO

__all__ = ["BudgetMetrics"]


class BudgetMetrics:
    """``veil_budget_refusals_total{reason}`` (budget, rate, per_call),
    ``veil_budget_soft_limit_total{scope}``, ``veil_budget_store_errors_total{op}``
    and ``veil_budget_spend_usd_total{team, model}``; with the Redis store's
    leases, ``veil_budget_lease_calls_total{outcome}`` (served from a lease, or
    missed: reserved in Redis although a lease was held),
    ``veil_budget_leases_expired_total`` and ``veil_budget_leases_open``, and
    ``veil_budget_outbox_unacked``: settles in the outbox that Redis has not
    acknowledged yet (read from the stores when scraped: nothing is counted
    on the hot path).
    Spend is summed in :attr:`spend_nanos` and read when scraped too."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refusals = PromCounter(
            "veil_budget_refusals", "Calls refused by a budget or rate limit.", ["reason"],
            registry=registry,
        )  # fmt: skip
        self.soft_limit = PromCounter(
            "veil_budget_soft_limit", "Calls served past a soft limit.", ["scope"],
            registry=registry,
        )  # fmt: skip
        self.store_errors = PromCounter(
            "veil_budget_store_errors", "Budget store operations that failed.", ["op"],
            registry=registry,
        )  # fmt: skip
        self.spend_nanos: dict[tuple[str, str], int] = {}
        """Settled nano-dollars per (team, model): the stage adds to it, a
        scrape reads it as ``veil_budget_spend_usd_total`` (a dict update
        per call instead of a locked Prometheus counter)."""
        self._leases: list[Any] = []
        self._outboxes: list[Any] = []
        self._closed = {"served": 0, "missed": 0, "expired": 0}
        registry.register(_LeaseCollector(self))

    def track(self, leases: Any) -> None:
        """Report the counts of a store's :class:`~veil_budget.redis_lease.Leases`."""
        self._leases.append(leases)

    def track_outbox(self, outbox: Any) -> None:
        """Report how many settles a store's :class:`~veil_budget.redis_outbox.Outbox` holds."""
        self._outboxes.append(outbox)

    def untrack_outbox(self, outbox: Any) -> None:
        """Stop reading ``outbox`` (its store closed)."""
        if outbox in self._outboxes:
            self._outboxes.remove(outbox)

    def outbox_unacked(self) -> int:
        """Settles Redis has not acknowledged, over the open stores' outboxes."""
        return sum(outbox.unacked() for outbox in self._outboxes)

    def untrack(self, leases: Any) -> None:
        """Stop reading ``leases`` (its store closed), keeping its counts."""
        if leases in self._leases:
            self._leases.remove(leases)
            for name in self._closed:
                self._closed[name] += getattr(leases, name)

    def lease_counts(self) -> dict[str, int]:
        """Served, missed and expired, over every store so far; and open leases."""
        counts = dict(self._closed)
        counts["open"] = 0
        for leases in self._leases:
            for name in self._closed:
                counts[name] += getattr(leases, name)
            counts["open"] += leases.open()
        return counts

    @classmethod
    def for_registry(cls, registry: Any) -> BudgetMetrics:
        """The metrics of ``registry``, created on first use (once per gateway)."""
        return per_registry(registry, cls)

    def count(self, what: str, label: str) -> None:
        """Count a refusal (``what="refused"``), a soft-limit pass or a store error."""
        metric = {
            "refused": self.refusals,
            "soft_limit": self.soft_limit,
            "store_error": self.store_errors,
        }[what]
        metric.labels(label).inc()


class _LeaseCollector:
    def __init__(self, metrics: BudgetMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        spend = CounterMetricFamily(
            "veil_budget_spend_usd", "Settled spend in USD.", labels=["team", "model"]
        )
        for (team, model), nanos in list(self.metrics.spend_nanos.items()):
            spend.add_metric([team, model], nanos / NANO)
        yield spend
        counts = self.metrics.lease_counts()
        calls = CounterMetricFamily(
            "veil_budget_lease_calls",
            "Calls of a kind with a Redis lease: served from it, or missed (reserved in Redis).",
            labels=["outcome"],
        )
        calls.add_metric(["served"], counts["served"])
        calls.add_metric(["missed"], counts["missed"])
        yield calls
        yield CounterMetricFamily(
            "veil_budget_leases_expired",
            "Leases Redis forgot while their replica held them (its keep-alives failed).",
            value=counts["expired"],
        )
        yield GaugeMetricFamily(
            "veil_budget_leases_open", "Leases this process holds.", value=counts["open"]
        )
        yield GaugeMetricFamily(
            "veil_budget_outbox_unacked",
            "Settles in this process's Redis outbox that Redis has not acknowledged yet.",
            value=self.metrics.outbox_unacked(),
        )
