"""Strategies over a model pool: parsing, the choice itself, and the stage
choosing with a router. The stage tests use :class:`TinyRouter`, a small but
real object with the ``QualityRouter`` interface of ``veil_routing.learned``
(predictions from keywords), so that they run without a trained artifact;
the end-to-end tests in ``test_gateway_learned.py`` use the real one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from routingtest import mock_dep, routing_policy
from veil_routing.metrics import RoutingMetrics
from veil_routing.settings import RoutingSettings
from veil_routing.stage import RoutingStage, make_stage
from veil_routing.strategy import Strategy, choose, parse_strategy

from veil.errors import BadRequest
from veil.policy.model import parse_policy
from veil.types import Call, Principal


class TinyRouter:
    """QualityRouter-compatible: hard prompts (``prove``, ``derive``) need the
    strong model; everything else is easy for every model."""

    models = ["gpt-4-router-name", "mixtral", "tiny"]

    def predict(self, prompt: str) -> dict[str, float]:
        hard = any(w in prompt.lower() for w in ("prove", "derive"))
        if hard:
            return {"gpt-4-router-name": 0.9, "mixtral": 0.6, "tiny": 0.2}
        return {"gpt-4-router-name": 0.95, "mixtral": 0.9, "tiny": 0.8}

    def predict_output_tokens(self, prompt: str) -> dict[str, int]:
        n = 600 if "essay" in prompt else 100
        return {"gpt-4-router-name": n, "mixtral": n + 50, "tiny": n + 100}

    def cluster(self, prompt: str) -> int:
        return 1 if "prove" in prompt.lower() else 0


class TinyFeedback:
    """FeedbackStore-compatible, in memory: a model's mean score in a cluster
    replaces its prediction once it has any feedback."""

    def __init__(self) -> None:
        self.chosen: dict[str, tuple[int, str]] = {}
        self.scores: dict[tuple[int, str], list[float]] = {}
        self.observed: list[tuple[str, int, bool]] = []

    def remember(self, request_id: str, cluster: int, model: str) -> None:
        self.chosen[request_id] = (cluster, model)

    def feedback(self, request_id: str, score: float) -> bool:
        if request_id not in self.chosen:
            return False
        self.scores.setdefault(self.chosen[request_id], []).append(score)
        return True

    def observe(self, model: str, cluster: int, *, error: bool, latency_s: float | None) -> None:
        self.observed.append((model, cluster, error))

    def adjust(self, cluster: int, predicted: dict[str, float]) -> dict[str, float]:
        out = dict(predicted)
        for (c, model), scores in self.scores.items():
            if c == cluster:
                out[model] = sum(scores) / len(scores)
        return out

    def close(self) -> None:
        pass


DEPS = [
    mock_dep("gpt-4o", input_per_mtok=5.0, output_per_mtok=15.0),
    mock_dep("mixtral", input_per_mtok=0.5, output_per_mtok=0.5),
    mock_dep("tiny", input_per_mtok=0.1, output_per_mtok=0.1),
    mock_dep("o-reasoner", input_per_mtok=1.0, output_per_mtok=4.0),
]
ROUTER = {
    "artifact": "router.bin",
    "sha256": "0" * 64,
    "models": {"gpt-4o": "gpt-4-router-name", "o-reasoner": "gpt-4-router-name"},
}
POOL = {"smart": {"models": ["gpt-4o", "mixtral", "tiny"]}}


def _stage(section: dict[str, Any], feedback: TinyFeedback | None = None) -> RoutingStage:
    text = routing_policy(DEPS, {"router": ROUTER, "pools": POOL, **section}, pipeline=["routing"])
    policy = parse_policy(text.encode())
    settings = RoutingSettings.model_validate(policy.sections["routing"])
    stage = make_stage(settings)
    stage.start(policy, RoutingMetrics(CollectorRegistry()), TinyRouter(), feedback)
    stage.policy = policy  # type: ignore[attr-defined]
    return stage


def _route(
    stage: RoutingStage,
    text: str,
    *,
    model: str = "smart",
    headers: dict[str, str] | None = None,
    team: str = "test",
    **request: Any,
) -> Call:
    call = Call(
        id="req-1",
        kind="chat",
        request={"model": model, "messages": [{"role": "user", "content": text}], **request},
        principal=Principal("key-1", team),
        policy=stage.policy,  # type: ignore[attr-defined]
        headers=headers or {},
    )
    asyncio.run(stage.on_request(call))
    return call


def _model(call: Call) -> str:
    assert call.route is not None
    return call.route.deployments[0].name


# -- parsing and choosing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("quality", Strategy("quality")),
        (" Balanced ", Strategy("balanced")),
        ("cost", Strategy("cost")),
        ("floor:0.7", Strategy("floor", 0.7)),
        ("floor=0.25", Strategy("floor", 0.25)),
        ("0.9", Strategy("floor", 0.9)),
        ("1", Strategy("floor", 1.0)),
    ],
)
def test_strategies_parse(text: str, expected: Strategy) -> None:
    assert parse_strategy(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "floor:", "floor:1.5", "-0.1", "nan", "floor:x"])
def test_bad_strategies_are_refused_saying_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="quality, balanced, cost"):
        parse_strategy(text)


def test_choose_takes_the_cheapest_model_that_clears_the_bar() -> None:
    predicted = {"a": 0.9, "b": 0.85, "c": 0.5}
    costs = {"a": 10.0, "b": 2.0, "c": 1.0}
    c = choose(["a", "b", "c"], predicted, costs, Strategy("balanced"), 0.9)
    assert (c.model, c.order, c.cleared) == ("b", ("b", "a", "c"), True)
    assert c.bar == pytest.approx(0.81)
    assert choose(["a", "b", "c"], predicted, costs, Strategy("quality"), 1.0).model == "a"
    assert choose(["a", "b", "c"], predicted, costs, Strategy("cost"), 0.5).model == "c"
    assert choose(["a", "b", "c"], predicted, costs, Strategy("floor", 0.5), 1.0).model == "c"


def test_an_unmet_floor_falls_back_to_the_best_model() -> None:
    c = choose(["a", "b"], {"a": 0.6, "b": 0.4}, {"a": 2, "b": 1}, Strategy("floor", 0.9), 1.0)
    assert (c.model, c.order, c.cleared) == ("a", ("a", "b"), False)


# -- the stage with a router -----------------------------------------------------------


def test_balanced_sends_easy_prompts_to_a_cheap_model_and_hard_ones_up() -> None:
    stage = _stage({})
    assert _model(_route(stage, "hello there")) == "mixtral"  # 0.9 >= 0.9 * 0.95
    assert _model(_route(stage, "prove that sqrt(2) is irrational")) == "gpt-4o"


def test_each_strategy_moves_the_bar() -> None:
    stage = _stage({})
    header = "x-veil-route-strategy"
    assert _model(_route(stage, "hello", headers={header: "quality"})) == "gpt-4o"
    assert _model(_route(stage, "hello", headers={header: "cost"})) == "tiny"
    assert _model(_route(stage, "hello", headers={header: "floor:0.85"})) == "mixtral"
    assert _model(_route(stage, "prove it", headers={header: "floor:0.5"})) == "mixtral"


def test_the_reason_and_the_audit_decision_say_why() -> None:
    stage = _stage({})
    call = _route(stage, "hello", headers={"x-veil-route-strategy": "cost"})
    assert call.route is not None
    assert call.route.reason == (
        "pool=smart; strategy=cost; model=tiny; quality=0.80; bar=0.71; deployment=tiny"
    )
    [d] = [d for d in call.decisions if d.stage == "routing"]
    assert d.action == "routed"
    assert d.detail["model"] == "tiny" and d.detail["strategy"] == "cost"
    assert d.detail["deployments"] == ["tiny", "mixtral", "gpt-4o"]
    unmet = _route(stage, "prove it", headers={"x-veil-route-strategy": "0.99"})
    assert unmet.route is not None and "floor-unmet" in unmet.route.reason


def test_failover_order_is_the_cheaper_clearing_models_then_by_quality() -> None:
    stage = _stage({})
    call = _route(stage, "hello", headers={"x-veil-route-strategy": "cost"})
    assert call.route is not None
    assert [d.name for d in call.route.deployments] == ["tiny", "mixtral", "gpt-4o"]


def test_strategy_precedence_header_rule_team_pool_policy() -> None:
    pools = {"smart": {"models": ["gpt-4o", "mixtral", "tiny"], "strategy": "cost"}}
    stage = _stage(
        {
            "pools": pools,
            "team_strategies": {"other": "quality"},
            "rules": [{"keywords": ["vip"], "route": "smart", "strategy": "quality"}],
        }
    )
    assert _model(_route(stage, "hello")) == "tiny"  # the pool's strategy
    assert _model(_route(stage, "hello", team="other")) == "gpt-4o"  # the team's
    assert _model(_route(stage, "hello vip")) == "gpt-4o"  # the rule's
    header = {"x-veil-route-strategy": "cost"}
    assert _model(_route(stage, "hello vip", headers=header)) == "tiny"  # the request's


def test_policy_default_strategy_applies_without_others() -> None:
    assert _model(_route(_stage({"strategy": "cost"}), "hello")) == "tiny"
    assert _model(_route(_stage({"strategy": "floor:0.92"}), "hello")) == "gpt-4o"


def test_bars_are_configurable() -> None:
    stage = _stage({"bars": {"balanced": 0.8, "cost": 0.5}})
    assert _model(_route(stage, "hello")) == "tiny"  # 0.8 >= 0.95 * 0.8


def test_a_bad_header_is_a_400_naming_the_header() -> None:
    with pytest.raises(BadRequest) as e:
        _route(_stage({}), "hello", headers={"x-veil-route-strategy": "cheapest"})
    assert e.value.param == "x-veil-route-strategy"
    assert e.value.code == "invalid_route_strategy"


def test_pool_model_unknown_to_the_router_stops_start_up() -> None:
    router = {**ROUTER, "models": {}}  # gpt-4o is "gpt-4-router-name" to the router
    with pytest.raises(ValueError, match=r"\[routing.pools.smart\] model 'gpt-4o' is unknown"):
        _stage({"router": router})


def test_pools_serve_chat_only() -> None:
    stage = _stage({})
    call = Call(
        id="r",
        kind="embeddings",
        request={"model": "smart", "input": "x"},
        principal=Principal("k", "test"),
        policy=stage.policy,  # type: ignore[attr-defined]
        headers={},
    )
    with pytest.raises(BadRequest, match="chat completions only"):
        asyncio.run(stage.on_request(call))


# -- output budgets --------------------------------------------------------------------------


def test_output_budget_caps_answers_from_the_predicted_length() -> None:
    stage = _stage({"output_budget": {"enabled": True, "margin": 1.5, "min_tokens": 64}})
    call = _route(stage, "hello", headers={"x-veil-route-strategy": "quality"})
    assert call.route is not None and call.route.max_output_tokens == 150  # 100 * 1.5
    call = _route(stage, "write an essay", headers={"x-veil-route-strategy": "cost"})
    assert call.route is not None and call.route.max_output_tokens == 1050  # tiny: 700 * 1.5
    assert call.decisions[-1].detail["max_output_tokens"] == 1050


def test_output_budget_respects_the_clients_max_tokens_and_the_bounds() -> None:
    stage = _stage(
        {"output_budget": {"enabled": True, "margin": 1.0, "min_tokens": 120, "max_tokens": 500}}
    )
    assert _route(stage, "hello", max_tokens=40).route.max_output_tokens is None  # type: ignore[union-attr]
    assert _route(stage, "hello").route.max_output_tokens == 150  # type: ignore[union-attr]
    hdr = {"x-veil-route-strategy": "quality"}
    assert _route(stage, "hi", headers=hdr).route.max_output_tokens == 120  # type: ignore[union-attr]
    assert _route(stage, "essay", headers=hdr).route.max_output_tokens == 500  # type: ignore[union-attr]


def test_output_budget_is_off_by_default() -> None:
    assert _route(_stage({}), "hello").route.max_output_tokens is None  # type: ignore[union-attr]


def test_reasoning_effort_for_reasoning_models() -> None:
    section = {
        "pools": {"think": {"models": ["o-reasoner"]}},
        "models": {"o-reasoner": {"reasoning": True}},
        "output_budget": {"enabled": True, "reasoning_effort": True, "low_below": 200},
    }
    stage = _stage(section)
    call = _route(stage, "hello", model="think")
    assert call.request["reasoning_effort"] == "low"
    call = _route(stage, "an essay please", model="think")
    assert call.request["reasoning_effort"] == "medium"
    call = _route(stage, "an essay please", model="think", reasoning_effort="high")
    assert call.request["reasoning_effort"] == "high"  # the client's own stays
    # a pool whose chain has a non-reasoning model gets no effort (it would refuse it)
    call = _route(_stage({**section, "pools": POOL}), "hello")
    assert "reasoning_effort" not in call.request


# -- feedback ----------------------------------------------------------------------------------


def test_feedback_adjusts_later_choices_and_sees_errors() -> None:
    fb = TinyFeedback()
    stage = _stage({"feedback": {"enabled": True}}, feedback=fb)
    call = _route(stage, "hello")
    assert _model(call) == "mixtral"
    # the callback the core calls after each attempt reaches the store
    assert call.route is not None and call.route.on_attempt is not None
    call.route.on_attempt(call.route.deployments[0], 0.1, None)
    assert fb.observed == [("mixtral", 0, False)]
    # a bad score for mixtral in this prompt cluster: next time the pool moves on
    [(rid, (cluster, model))] = fb.chosen.items()
    assert (cluster, model) == (0, "mixtral")
    assert fb.feedback(rid, 0.1)
    assert _model(_route(stage, "hello again")) == "gpt-4o"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "é" * 50}, {"role": "user", "content": "x" * 3000}],
        [{"role": "user", "content": [{"type": "text", "text": 'a\nb"c' * 40}]}] * 7,
        [{"role": "user"}] * 30,
    ],
)
def test_the_cheap_size_bound_is_never_below_the_estimate(messages: list[Any]) -> None:
    import orjson
    from veil_routing.stage import prompt_tokens

    stage = _stage({})
    body = {"model": "tiny", "messages": messages, "max_tokens": 10}
    call = Call(
        id="r",
        kind="chat",
        request=body,
        principal=Principal("k", "test"),
        policy=stage.policy,  # type: ignore[attr-defined]
        headers={"content-length": str(len(orjson.dumps(body)))},
    )
    assert stage._size_bound(call) >= prompt_tokens(body, 4.0) + 10
