"""The plugin's Prometheus metrics, in the gateway's registry (``/metrics``).

Labels hold only names the policy defines (teams, deployments, budget
reasons), entity types, cache states and HTTP status codes: never request
text, user ids or free text. Registered once per registry: policy reloads
reuse them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily

from veil.metrics import per_registry

__all__ = ["AuditMetrics"]


class _Totals:
    """Calls, tokens and cost by team and model, kept in plain dicts and
    turned into counters when ``/metrics`` is read: a per-call update costs
    a few additions instead of four locked counter increments."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, int], list[float]] = {}

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        calls = CounterMetricFamily(
            "veil_audit_calls", "Calls audited, by team, model and HTTP status.",
            labels=["team", "model", "status"],
        )  # fmt: skip
        tokens = CounterMetricFamily(
            "veil_audit_tokens", "Tokens, by team, model and direction (input, output).",
            labels=["team", "model", "direction"],
        )  # fmt: skip
        cost = CounterMetricFamily(
            "veil_audit_cost_usd", "Cost in USD at the deployments' prices, by team and model.",
            labels=["team", "model"],
        )  # fmt: skip
        by_model: dict[tuple[str, str], list[float]] = {}
        for (team, model, status), row in list(self.rows.items()):
            calls.add_metric([team, model, str(status)], row[0])
            acc = by_model.setdefault((team, model), [0.0, 0.0, 0.0])
            acc[0] += row[1]
            acc[1] += row[2]
            acc[2] += row[3]
        for (team, model), (tin, tout, usd) in by_model.items():
            tokens.add_metric([team, model, "input"], tin)
            tokens.add_metric([team, model, "output"], tout)
            cost.add_metric([team, model], usd)
        yield calls
        yield tokens
        yield cost


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

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.totals = _Totals()
        registry.register(self.totals)
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

    @classmethod
    def for_registry(cls, registry: Any) -> AuditMetrics:
        """The metrics of ``registry``, created on first use (once per gateway)."""
        return per_registry(registry, cls)

    def observe(self, record: dict[str, Any]) -> None:
        """Count one call's record (this is the hot path: see :class:`_Totals`)."""
        team = record["principal"]["team"]
        model = record["deployment"] or record["model"]
        key = (team, model, record["status"])
        row = self.totals.rows.get(key)
        if row is None:
            row = self.totals.rows[key] = [0, 0, 0, 0.0]
        row[0] += 1
        row[1] += record["tokens_in"]
        row[2] += record["tokens_out"]
        row[3] += record["cost_usd"]
        if record["pii"]:
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
