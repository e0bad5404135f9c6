"""``GET /admin/routing`` (admin keys): the state the routing stage keeps in
this process, per deployment: circuit breaker state, latency moving average,
calls in flight (counted when a model balances by them)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .stage import RoutingStage

__all__ = ["routing_state", "state_endpoint"]


def routing_state(stage: RoutingStage) -> list[dict[str, Any]]:
    """One entry per deployment of the policy, in policy order."""
    balancer = stage.balancer
    if balancer is None:
        return []
    out = []
    for model in stage.models.values():
        for dep in model.deployments:
            stats = balancer.stats(dep)
            breaker = stage._breaker_of.get(dep) if stage._breaker_of else None
            out.append(
                {
                    "deployment": stats.label,
                    "model": model.name,
                    "breaker": breaker.state if breaker is not None else "disabled",
                    "latency_ewma_ms": None if stats.ewma is None else round(stats.ewma * 1000, 3),
                    "inflight": stats.inflight,
                }
            )
    return out


async def state_endpoint(request: Request) -> Response:
    """The routing state of the policy in force (empty without a routing stage)."""
    runtime = request.state.runtime
    data = []
    for spec in runtime.stages:
        if isinstance(spec.stage, RoutingStage):
            data = routing_state(spec.stage)
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")
