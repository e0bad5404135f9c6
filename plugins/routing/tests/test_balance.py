"""Load balancing across deployments of the same model: round robin, least
in flight, latency-aware (moving average)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

import openai
from routingtest import chat, mock_dep
from veil_routing.balance import Balancer

from veil.testing import TEST_KEY, ServerThread
from veil.types import Deployment

Gateway = Callable[..., ServerThread]


def _deps(n: int = 3) -> list[Deployment]:
    return [Deployment(name="m", provider="mock", model=f"up-{i}") for i in range(n)]


def test_round_robin_rotates_the_first_choice_and_keeps_the_rest_as_failover() -> None:
    deps = _deps()
    b = Balancer(deps, default="round_robin", per_model={}, alpha=0.5)
    orders = [[d.model for d in b.order("m", deps)] for _ in range(4)]
    assert orders == [
        ["up-0", "up-1", "up-2"],
        ["up-1", "up-2", "up-0"],
        ["up-2", "up-0", "up-1"],
        ["up-0", "up-1", "up-2"],
    ]
    assert [b.label(d) for d in deps] == ["m[0]", "m[1]", "m[2]"]


def test_least_inflight_prefers_the_idle_deployment() -> None:
    deps = _deps()
    b = Balancer(deps, default="least_inflight", per_model={}, alpha=0.5)
    b.started(deps[0])
    b.started(deps[0])
    b.started(deps[1])
    assert b.order("m", deps)[0] is deps[2]
    b.finished(deps[0])
    b.finished(deps[0])
    assert {b.order("m", deps)[0].model for _ in range(3)} <= {"up-0", "up-2"}


def test_latency_prefers_the_lowest_moving_average() -> None:
    deps = _deps(2)
    b = Balancer(deps, default="round_robin", per_model={"m": "latency"}, alpha=0.5)
    b.observe_latency(deps[0], 0.2)
    b.observe_latency(deps[1], 0.05)
    assert [b.order("m", deps)[0] for _ in range(4)] == [deps[1]] * 4
    for _ in range(4):  # deps[1] slows down: the average follows
        b.observe_latency(deps[1], 1.0)
    assert b.order("m", deps)[0] is deps[0]
    assert b.stats(deps[1]).ewma is not None and b.stats(deps[1]).ewma > 0.2


def test_round_robin_in_the_gateway(routing_gateway: Gateway) -> None:
    gw = routing_gateway([mock_dep("pooled", "up-a"), mock_dep("pooled", "up-b")], {})
    seen = [chat(gw, "pooled")[0].model for _ in range(6)]
    assert seen == ["up-a", "up-b"] * 3
    _, headers = chat(gw, "pooled")
    assert headers["x-veil-route"] == "model=pooled; deployment=pooled[0]"


def test_latency_aware_in_the_gateway_avoids_the_slow_deployment(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        [mock_dep("pooled", "up-slow", options={"latency_ms": 150}), mock_dep("pooled", "up-fast")],
        {"balance": "latency"},
    )
    counts = collections.Counter(chat(gw, "pooled")[0].model for _ in range(12))
    # each is tried once (an unmeasured deployment goes first), then the fast one wins
    assert counts == {"up-slow": 1, "up-fast": 11}


def test_least_inflight_in_the_gateway(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        [mock_dep("pooled", "up-slow", options={"latency_ms": 3000}), mock_dep("pooled", "up-b")],
        {"model_balance": {"pooled": "least_inflight"}},
    )

    async def scenario() -> tuple[str, list[str]]:
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0
        ) as c:

            async def one() -> str:
                r = await c.chat.completions.create(
                    model="pooled", messages=[{"role": "user", "content": "hi"}]
                )
                return r.model

            slow = asyncio.ensure_future(one())  # the first call goes to up-slow and stays
            await asyncio.sleep(0.3)
            quick = [await one() for _ in range(4)]
            return await slow, quick

    slow, quick = asyncio.run(scenario())
    assert slow == "up-slow"
    assert quick == ["up-b"] * 4
    # every call finished: nothing is counted in flight any more
    runtime = gw.gateway.runtime
    stage = next(s.stage for s in runtime.stages if s.name == "routing")
    assert [stage.balancer.stats(d).inflight for d in runtime.policy.models["pooled"]] == [0, 0]
