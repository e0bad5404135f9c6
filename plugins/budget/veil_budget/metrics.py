"""The plugin's Prometheus metrics, in the gateway's registry (``/metrics``).

Registered once per registry: policy reloads reuse them.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from veil.metrics import per_registry

__all__ = ["BudgetMetrics"]


class BudgetMetrics:
    """``veil_budget_refusals_total{reason}`` (budget, rate, per_call),
    ``veil_budget_soft_limit_total{scope}``, ``veil_budget_store_errors_total{op}``
    and ``veil_budget_spend_usd_total{team, model}``."""

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
        self.spend = PromCounter(
            "veil_budget_spend_usd", "Settled spend in USD.", ["team", "model"],
            registry=registry,
        )  # fmt: skip

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
