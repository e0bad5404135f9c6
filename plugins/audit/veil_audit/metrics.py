"""The plugin's Prometheus metrics, in the gateway's registry (``/metrics``).

Labels hold only names the policy defines (teams, deployments, budget
reasons), entity types, cache states and HTTP status codes: never request
text, user ids or free text. Registered once per registry: policy reloads
reuse them.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter

__all__ = ["AuditMetrics"]


class AuditMetrics:
    """``veil_audit_calls_total{team, model, status}``,
    ``veil_audit_tokens_total{team, model, direction}``,
    ``veil_audit_cost_usd_total{team, model}``,
    ``veil_audit_pii_detections_total{entity_type, action}``,
    ``veil_audit_cache_total{team, status}``,
    ``veil_audit_budget_refusals_total{team, reason}``,
    ``veil_audit_failovers_total{team, model}``,
    ``veil_audit_records_total{result}`` (written, dropped) and
    ``veil_audit_sink_errors_total{sink}``."""

    _by_registry: dict[int, tuple[CollectorRegistry, AuditMetrics]] = {}
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.calls = counter(
            "veil_audit_calls", "Calls audited, by team, model and HTTP status.",
            ["team", "model", "status"],
        )  # fmt: skip
        self.tokens = counter(
            "veil_audit_tokens", "Tokens, by team, model and direction (input, output).",
            ["team", "model", "direction"],
        )  # fmt: skip
        self.cost = counter(
            "veil_audit_cost_usd", "Cost in USD at the deployments' prices, by team and model.",
            ["team", "model"],
        )  # fmt: skip
        self.pii = counter(
            "veil_audit_pii_detections", "Personal data found, by entity type and action.",
            ["entity_type", "action"],
        )  # fmt: skip
        self.cache = counter(
            "veil_audit_cache", "Calls a cache stage looked up, by team and result.",
            ["team", "status"],
        )  # fmt: skip
        self.refusals = counter(
            "veil_audit_budget_refusals", "Calls refused by a budget or rate limit.",
            ["team", "reason"],
        )  # fmt: skip
        self.failovers = counter(
            "veil_audit_failovers", "Moves to a later deployment of a route.", ["team", "model"]
        )
        self.records = counter(
            "veil_audit_records", "Audit records, by result (written, dropped).", ["result"]
        )
        self.sink_errors = counter(
            "veil_audit_sink_errors", "Failures of secondary sinks (stdout, otel).", ["sink"]
        )
        self.written = self.records.labels("written")
        self.dropped = self.records.labels("dropped")
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any, Any]] = {}

    @classmethod
    def for_registry(cls, registry: Any) -> AuditMetrics:
        """The metrics of ``registry``, created on first use."""
        with cls._lock:
            found = cls._by_registry.get(id(registry))
            if found is None or found[0] is not registry:
                found = cls._by_registry[id(registry)] = (registry, cls(registry))
            return found[1]

    def observe(self, record: dict[str, Any]) -> None:
        """Count one call's record (label children cached: this is the hot path)."""
        team = record["principal"]["team"]
        model = record["deployment"] or record["model"]
        status = record["status"]
        key = (team, model, status)
        children = self._children.get(key)
        if children is None:
            if len(self._children) > 10_000:
                self._children.clear()
            children = self._children[key] = (
                self.calls.labels(team, model, str(status)),
                self.tokens.labels(team, model, "input"),
                self.tokens.labels(team, model, "output"),
                self.cost.labels(team, model),
            )
        calls, tokens_in, tokens_out, cost = children
        calls.inc()
        if record["tokens_in"]:
            tokens_in.inc(record["tokens_in"])
        if record["tokens_out"]:
            tokens_out.inc(record["tokens_out"])
        if record["cost_usd"]:
            cost.inc(record["cost_usd"])
        for kind, actions in record["pii"].items():
            for action, n in actions.items():
                self.pii.labels(kind, action).inc(n)
        if record["cache"] is not None:
            self.cache.labels(team, record["cache"]).inc()
        budget = record["budget"]
        if budget is not None and budget["action"] == "refused":
            self.refusals.labels(team, budget.get("reason", "(other)")).inc()
        if record["failovers"]:
            self.failovers.labels(team, model).inc(record["failovers"])
