"""The ``otel`` sink: one OpenTelemetry span per call, with the GenAI
semantic conventions' attributes (``gen_ai.*``) and veil's own (``veil.*``).

Spans go through the OpenTelemetry SDK's global tracer provider, which the
operator configures as for any Python service (an OTLP exporter to their
collector, usually); veil-audit adds no exporter of its own and sends
nothing anywhere by itself. Needs the ``otel`` extra
(``pip install 'veil-audit[otel]'``). Spans are made on the writer thread,
after the record is written; an exporter that fails never fails a call.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

__all__ = ["OtelMissing", "span_sink"]


class OtelMissing(ImportError):
    """The ``otel`` sink is configured but the SDK is not installed."""


def span_sink(version: str) -> Callable[[dict[str, Any]], None]:
    """A function that turns a ``call`` record into a finished span.

    :raises OtelMissing: ``opentelemetry-sdk`` is not installed.
    """
    try:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
    except ImportError:
        raise OtelMissing(
            '[audit] sinks lists "otel" but the OpenTelemetry SDK is not installed; '
            "pip install 'veil-audit[otel]'"
        ) from None

    tracer = trace.get_tracer("veil_audit", version)

    def emit(record: dict[str, Any]) -> None:
        if record.get("event") != "call":
            return
        start = _ns(record["started_at"])
        end = start + int(record["latency_ms"]["total"] * 1_000_000)
        operation = "chat" if record["kind"] == "chat" else "embeddings"
        attributes = _attributes(record, operation)
        span = tracer.start_span(
            f"{operation} {record['model']}",
            kind=SpanKind.CLIENT,
            start_time=start,
            attributes=attributes,
        )
        error = record["error"]
        if error is not None:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end)

    return emit


def _attributes(record: dict[str, Any], operation: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": record["model"],
        "gen_ai.usage.input_tokens": record["tokens_in"],
        "gen_ai.usage.output_tokens": record["tokens_out"],
        "veil.request_id": record["request_id"],
        "veil.team": record["principal"]["team"],
        "veil.key_id": record["principal"]["key_id"],
        "veil.policy.version": record["policy"]["version"],
        "veil.cost_usd": record["cost_usd"],
        "veil.attempts": record["attempts"],
        "veil.failovers": record["failovers"],
        "veil.status": record["status"],
        "veil.latency.gateway_ms": record["latency_ms"]["gateway"],
        "veil.latency.upstream_ms": record["latency_ms"]["upstream"],
    }
    if record["provider"]:
        out["gen_ai.provider.name"] = record["provider"]
        out["gen_ai.system"] = record["provider"]
    if record["upstream_model"]:
        out["gen_ai.response.model"] = record["upstream_model"]
    if record["deployment"]:
        out["veil.deployment"] = record["deployment"]
    if record["cache"]:
        out["veil.cache"] = record["cache"]
    if record["error"] is not None:
        out["error.type"] = record["error"]["code"] or record["error"]["type"]
    for kind, actions in record["pii"].items():
        for action, n in actions.items():
            out[f"veil.pii.{kind}.{action}"] = n
    return out


def _ns(iso: str) -> int:
    return int(dt.datetime.fromisoformat(iso).timestamp() * 1_000_000_000)
