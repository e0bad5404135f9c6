"""The ``routing`` stage: turns the requested model into a :class:`RouteDecision`.

For each call, in ``on_request``:

1. the ``x-veil-route-strategy`` header, if any, is parsed (a bad value is a 400);
2. the first matching rule (:mod:`veil_routing.rules`) may send the call to
   another target; otherwise the target is the requested model;
3. a pool target is resolved by strategy with the learned router (the cheapest
   model predicted to clear the bar), an alias by its weights and order, a
   model by itself: the result is an ordered list of policy model names;
4. each model's deployments that the caller's team may use, that have the
   capabilities the request needs (tools, JSON mode) and a context window
   large enough for the prompt, and whose circuit breaker is not open, are
   ordered by the load balancer and appended to the failover chain;
5. the decision (with a reason for ``x-veil-route`` and an ``on_attempt``
   callback feeding breakers, latency averages and feedback) replaces
   ``call.route``, and is recorded with ``call.decide("routing", ...)``.

A call for a name that is no model, alias, pool or rule target is left alone
(the core answers 404).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from veil.errors import BadRequest, NotFound, Unavailable, UpstreamError, UpstreamRejected
from veil.policy.model import Policy
from veil.types import Call, Decision, Deployment, RouteDecision

from .balance import Balancer
from .breaker import Breaker, BreakerBoard
from .metrics import RoutingMetrics
from .rules import compile_rules, first_match, last_user_text
from .settings import RoutingSettings
from .strategy import Strategy, choose, parse_strategy

__all__ = [
    "FeedbackLike",
    "RouterLike",
    "RoutingStage",
    "STRATEGY_HEADER",
    "TrackingRoutingStage",
    "feedback_key",
    "make_stage",
    "prompt_tokens",
]

log = structlog.get_logger("veil_routing")

STRATEGY_HEADER = "x-veil-route-strategy"


class RouterLike(Protocol):
    """What the stage needs of a learned router (``veil_routing.learned.QualityRouter``)."""

    models: list[str]

    def predict(self, prompt: str) -> dict[str, float]: ...
    def predict_output_tokens(self, prompt: str) -> dict[str, int]: ...
    def cluster(self, prompt: str) -> int: ...


class FeedbackLike(Protocol):
    """What the stage needs of ``veil_routing.feedback.FeedbackStore``."""

    def remember(self, request_id: str, cluster: int, model: str) -> None: ...
    def feedback(self, request_id: str, score: float) -> bool: ...
    def observe(
        self, model: str, cluster: int, *, error: bool, latency_s: float | None
    ) -> None: ...
    def adjust(self, cluster: int, predicted: dict[str, float]) -> dict[str, float]: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Model:
    """A policy model name: its deployments and what they can do."""

    name: str
    deployments: tuple[Deployment, ...]
    tools: bool
    json_mode: bool
    reasoning: bool
    windows: tuple[int | None, ...]
    input_price: float
    output_price: float
    team_limited: bool


class _Alias:
    __slots__ = ("cumulative", "name", "targets", "total")

    def __init__(self, name: str, targets: Sequence[str], weights: Sequence[float] | None) -> None:
        self.name = name
        self.targets = tuple(targets)
        self.cumulative = list(itertools.accumulate(weights)) if weights else None
        self.total = self.cumulative[-1] if self.cumulative else 0.0

    def order(self) -> tuple[str, ...]:
        """The targets to try: a weighted pick first, then the rest in order."""
        if self.cumulative is None:
            return self.targets
        i = bisect.bisect_right(self.cumulative, random.random() * self.total)
        i = min(i, len(self.targets) - 1)
        if i == 0:
            return self.targets
        return (self.targets[i], *self.targets[:i], *self.targets[i + 1 :])


def _needs_tools(request: dict[str, Any]) -> bool:
    tools = request.get("tools")
    return bool(tools) or bool(request.get("functions"))


def _needs_json(request: dict[str, Any]) -> bool:
    fmt = request.get("response_format")
    return type(fmt) is dict and fmt.get("type") in ("json_object", "json_schema")


def _requested_output(request: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        v = request.get(key)
        if type(v) is int and v > 0:
            return v
    return 0


def prompt_tokens(request: dict[str, Any], chars_per_token: float) -> int:
    """A cheap estimate of the prompt's tokens: characters of every message's
    text (and of the tool definitions) over ``chars_per_token``, plus 4 per
    message for the chat format. No tokenizer: this runs on every call."""
    messages = request.get("messages")
    chars = 0
    count = 0
    if type(messages) is list:
        for m in messages:
            if type(m) is not dict:
                continue
            count += 1
            content = m.get("content")
            if type(content) is str:
                chars += len(content)
            elif type(content) is list:
                for part in content:
                    if type(part) is dict:
                        text = part.get("text")
                        if type(text) is str:
                            chars += len(text)
    tools = request.get("tools")
    if type(tools) is list and tools:
        chars += len(repr(tools))
    return math.ceil(chars / chars_per_token) + 4 * count


class RoutingStage:
    """The stage. Built from the settings at registration; :meth:`start` binds
    it to the policy (deployments, router, feedback store, metrics)."""

    name = "routing"

    def __init__(self, settings: RoutingSettings) -> None:
        self.settings = settings
        self.rules = compile_rules(settings.rules)
        self.aliases = {
            name: _Alias(name, a.targets, a.weights) for name, a in settings.aliases.items()
        }
        self.pools = dict(settings.pools)
        self.router: RouterLike | None = None
        self.feedback: FeedbackLike | None = None
        self.metrics: RoutingMetrics | None = None
        self.breakers: BreakerBoard | None = None
        self.balancer: Balancer | None = None
        self.models: dict[str, _Model] = {}
        self._router_names: dict[str, str] = {}
        self._reasons: dict[tuple[str, Deployment], str] = {}
        self._breaker_of: dict[Deployment, Breaker] | None = None
        self._chars_per_token = settings.chars_per_token
        self._default_strategy = parse_strategy(settings.strategy)
        self._team_strategies = {t: parse_strategy(v) for t, v in settings.team_strategies.items()}

    # -- start-up -------------------------------------------------------------------

    def start(
        self,
        policy: Policy,
        metrics: RoutingMetrics,
        router: RouterLike | None = None,
        feedback: FeedbackLike | None = None,
    ) -> None:
        """Bind to ``policy``. ``router`` is required when the policy has pools.

        :raises ValueError: a pool model the router does not know (message names it).
        """
        s = self.settings
        self.metrics = metrics
        self.router = router
        self.feedback = feedback
        self.balancer = Balancer(
            policy.deployments,
            default=s.balance,
            per_model=dict(s.model_balance),
            alpha=s.ewma_alpha,
        )
        if s.breaker.enabled:
            self.breakers = BreakerBoard(
                failures=s.breaker.failures,
                window_s=s.breaker.window_s,
                cooldown_s=s.breaker.cooldown_s,
                on_transition=metrics.transition,
                carried=metrics.breakers,
            )
        if self.breakers is not None:
            board, label = self.breakers, self.balancer.label
            self._breaker_of = {d: board.get(label(d), _upstream(d)) for d in policy.deployments}
            board.forget_others()
        for name, deps in policy.models.items():
            caps = s.models.get(name)
            self.models[name] = _Model(
                name=name,
                deployments=tuple(deps),
                tools=caps.tools if caps else True,
                json_mode=caps.json_mode if caps else True,
                reasoning=caps.reasoning if caps else False,
                windows=tuple(
                    (caps.context_window if caps and caps.context_window else d.context_window)
                    for d in deps
                ),
                input_price=min(d.input_per_mtok for d in deps),
                output_price=min(d.output_per_mtok for d in deps),
                team_limited=any(d.teams is not None for d in deps),
            )
        if self.pools:
            assert router is not None
            known = set(router.models)
            mapping = s.router.models if s.router else {}
            for pool_name, pool in self.pools.items():
                for m in pool.models:
                    rname = mapping.get(m, m)
                    if rname not in known:
                        raise ValueError(
                            f"[routing.pools.{pool_name}] model {m!r} is unknown to the router "
                            f"(as {rname!r}); map it in [routing.router.models] to one of "
                            f"{', '.join(sorted(known)[:12])}"
                        )
                    self._router_names[m] = rname

    # -- the request path -------------------------------------------------------------

    async def on_request(self, call: Call) -> None:
        request = call.request
        model = request.get("model")
        if type(model) is not str:
            return
        header = call.headers.get(STRATEGY_HEADER)
        strategy: Strategy | None = None
        if header is not None:
            try:
                strategy = parse_strategy(header)
            except ValueError as e:
                raise BadRequest(
                    str(e), code="invalid_route_strategy", param=STRATEGY_HEADER
                ) from None
        rule = first_match(self.rules, call, model) if self.rules else None
        if rule is not None:
            target = rule.route
            if strategy is None:
                strategy = rule.strategy
        else:
            target = model
        budget: int | None = None
        effort: str | None = None
        on_attempt = self._on_attempt
        detail: dict[str, Any] = {"target": target}
        if rule is not None:
            detail["rule"] = rule.label
        pooled = target in self.pools
        if pooled:
            names, reason, budget, effort, on_attempt = self._pool(call, target, strategy, detail)
        elif target in self.aliases:
            names = self.aliases[target].order()
            reason = f"alias={target}"
        elif target in self.models:
            names = (target,)
            reason = f"model={target}"
        else:
            return  # unknown model, no rule: the core answers 404
        if rule is not None:
            reason = f"rule={rule.label}; {reason}"
        chain = self._chain(call, model, names)
        if effort is not None and all(self.models[n].reasoning for n in names):
            request["reasoning_effort"] = effort
            detail["reasoning_effort"] = effort
        assert self.balancer is not None
        first = chain[0]
        label = self.balancer.label
        if pooled:
            reason = f"{reason}; deployment={label(first)}"
        else:  # static reasons repeat: build each once
            key = (reason, first)
            cached = self._reasons.get(key)
            if cached is None:
                cached = self._reasons[key] = f"{reason}; deployment={label(first)}"
            reason = cached
        call.route = RouteDecision(chain, budget, reason, on_attempt)
        detail["deployments"] = [label(first)] if len(chain) == 1 else [label(d) for d in chain]
        if budget is not None:
            detail["max_output_tokens"] = budget
        call.decisions.append(Decision("routing", "routed", detail))
        if self._tracks:
            self.balancer.started(first)
            call.scratch["routing"] = first

    _tracks = False

    def _chain(self, call: Call, requested: str, names: Iterable[str]) -> list[Deployment]:
        """The failover chain for ``names``; raises when nothing is usable."""
        assert self.balancer is not None
        request = call.request
        chat = call.kind == "chat"
        tools = chat and _needs_tools(request)
        json_mode = chat and _needs_json(request)
        team = call.principal.team
        breakers = self._breaker_of
        need: int | None = None
        bound: int | None = None
        chain: list[Deployment] = []
        why: set[str] = set()
        retry_in: list[float] = []
        permitted = False  # some deployment of the route is open to the team
        for name in names:
            m = self.models[name]
            if m.team_limited and not any(d.allows(team) for d in m.deployments):
                continue
            permitted = True
            if tools and not m.tools:
                why.add("tools")
                continue
            if json_mode and not m.json_mode:
                why.add("JSON mode")
                continue
            usable: list[Deployment] = []
            for dep, window in zip(m.deployments, m.windows, strict=True):
                if m.team_limited and not dep.allows(team):
                    continue
                if chat and window is not None:
                    if bound is None:
                        bound = self._size_bound(call)
                    if bound > window:  # the cheap bound does not settle it: count
                        if need is None:
                            need = prompt_tokens(
                                request, self._chars_per_token
                            ) + _requested_output(request)
                        if need > window:
                            why.add("context")
                            continue
                if breakers is not None:
                    b = breakers[dep]
                    if b.state != "closed" and not b.available():
                        why.add("breaker")
                        retry_in.append(b.retry_in())
                        continue
                usable.append(dep)
            if usable:
                chain += self.balancer.order(name, usable)
        if chain:
            return chain
        call.decide("routing", "refused", target=requested, reasons=sorted(why))
        if not permitted:  # nothing here for this team: as if the model did not exist
            raise NotFound.model(requested)
        if "breaker" in why:
            wait = max(1, math.ceil(min(retry_in, default=1.0)))
            raise Unavailable(
                f"Every deployment that could serve {requested!r} is failing and its circuit "
                f"breaker is open; retry in {wait} s.",
                code="deployments_unavailable",
                headers={"retry-after": str(wait)},
            )
        if "context" in why:
            raise BadRequest(
                f"The prompt (about {need} tokens with the requested output) is longer than the "
                f"context window of every deployment that could serve {requested!r}; shorten "
                "it or ask for a model with a larger window.",
                code="context_length_exceeded",
                param="messages",
            )
        if "tools" in why or "JSON mode" in why:
            missing = " and ".join(sorted(why & {"tools", "JSON mode"}))
            raise BadRequest(
                f"No deployment that could serve {requested!r} supports {missing}, which "
                "the request uses; ask for another model.",
                code="unsupported_capability",
                param="tools" if "tools" in why else "response_format",
            )
        raise NotFound.model(requested)  # pragma: no cover - every skip records a reason

    def _size_bound(self, call: Call) -> int:
        """An upper bound of :func:`prompt_tokens` plus the requested output,
        from the body's ``Content-Length``: a body of L bytes holds at most L
        characters of text and (L + 1) / 3 messages (each at least ``{},``).
        When the bound fits a context window, counting is not needed. Without
        a usable length (or with tools, whose estimate is not bounded by their
        JSON size) it is effectively infinite."""
        request = call.request
        raw = call.headers.get("content-length")
        if raw is None or request.get("tools"):
            return 1 << 62
        try:
            size = int(raw)
        except ValueError:
            return 1 << 62
        return (
            math.ceil(size / self._chars_per_token)
            + 4 * (size // 3 + 1)
            + _requested_output(request)
        )

    def _pool(
        self, call: Call, name: str, strategy: Strategy | None, detail: dict[str, Any]
    ) -> tuple[tuple[str, ...], str, int | None, str | None, Any]:
        """Resolve a pool: predicted quality per model, the strategy's bar, the
        cheapest model clearing it; the output budget and reasoning effort."""
        if call.kind != "chat":
            raise BadRequest(
                f"{name!r} is a routing pool, which serves chat completions only.",
                code="model_not_supported",
                param="model",
            )
        router = self.router
        assert router is not None
        s = self.settings
        pool = self.pools[name]
        if strategy is None:
            team = self._team_strategies.get(call.principal.team)
            if team is not None:
                strategy = team
            elif pool.strategy is not None:
                strategy = parse_strategy(pool.strategy)
            else:
                strategy = self._default_strategy
        prompt = last_user_text(call.request)
        raw = router.predict(prompt)
        cluster: int | None = None
        if self.feedback is not None:
            cluster = router.cluster(prompt)
            raw = self.feedback.adjust(cluster, raw)
        lengths = router.predict_output_tokens(prompt)
        rn = self._router_names
        models = pool.models
        predicted = {m: float(raw[rn[m]]) for m in models}
        tokens_in = prompt_tokens(call.request, self._chars_per_token)
        costs = {
            m: tokens_in * self.models[m].input_price
            + lengths.get(rn[m], 256) * self.models[m].output_price
            for m in models
        }
        relative = getattr(s.bars, strategy.name, 1.0)
        choice = choose(models, predicted, costs, strategy, relative)
        chosen = choice.model
        if self.metrics is not None:
            self.metrics.pool_choices.labels(name, chosen, strategy.name).inc()
        detail.update(
            strategy=strategy.label,
            model=chosen,
            quality=round(choice.quality, 4),
            bar=round(choice.bar, 4),
            cleared=choice.cleared,
        )
        reason = (
            f"pool={name}; strategy={strategy.label}; model={chosen}; "
            f"quality={choice.quality:.2f}; bar={choice.bar:.2f}"
        )
        if not choice.cleared:
            reason += "; floor-unmet"
        budget: int | None = None
        effort: str | None = None
        ob = s.output_budget
        if ob.enabled and _requested_output(call.request) == 0:
            predicted_len = int(lengths.get(rn[chosen], 256))
            budget = max(ob.min_tokens, math.ceil(predicted_len * ob.margin))
            if ob.max_tokens is not None:
                budget = min(budget, ob.max_tokens)
            if ob.reasoning_effort and "reasoning_effort" not in call.request:
                effort = (
                    "low"
                    if predicted_len < ob.low_below
                    else "medium"
                    if predicted_len < ob.medium_below
                    else "high"
                )
        on_attempt = self._on_attempt
        if self.feedback is not None and cluster is not None:
            store = self.feedback
            store.remember(feedback_key(call.principal.key_id, call.id), cluster, rn[chosen])
            on_attempt = self._feedback_callback(store, cluster)
        return choice.order, reason, budget, effort, on_attempt

    def _feedback_callback(self, store: FeedbackLike, cluster: int) -> Any:
        rn = self._router_names
        base = self._on_attempt

        def on_attempt(dep: Deployment, seconds: float, error: UpstreamError | None) -> None:
            base(dep, seconds, error)
            model = rn.get(dep.name)
            if model is not None and (error is None or _counts(error)):
                store.observe(model, cluster, error=error is not None, latency_s=seconds)

        return on_attempt

    def _on_attempt(self, dep: Deployment, seconds: float, error: UpstreamError | None) -> None:
        """The core's per-attempt report: breakers and latency averages."""
        balancer = self.balancer
        assert balancer is not None
        breakers = self._breaker_of
        if error is None:
            balancer.observe_latency(dep, seconds)
            if breakers is not None:
                b = breakers.get(dep)
                if b is not None and b.state != "closed":
                    b.success()
        elif _counts(error):
            if error.code == "upstream_timeout":
                balancer.observe_latency(dep, seconds)
            if breakers is not None:
                b = breakers.get(dep)
                if b is not None:
                    b.failure()


class TrackingRoutingStage(RoutingStage):
    """The stage when a model balances by calls in flight: it also counts the
    calls each deployment has, until they finish."""

    _tracks = True

    async def on_finish(self, call: Call) -> None:
        dep = call.scratch.pop("routing", None)
        if dep is not None and self.balancer is not None:
            self.balancer.finished(dep)


def _upstream(dep: Deployment) -> tuple[str, str, str, str | None, str | None]:
    """What makes a deployment the same upstream across policy loads (its
    breaker carries over; prices or timeouts may change)."""
    return (dep.name, dep.provider, dep.model, dep.api_base, dep.api_key_env)


def _counts(error: UpstreamError) -> bool:
    """Whether an upstream error is the deployment's fault (429, 5xx, timeouts,
    connection errors), not the request's (its 400s)."""
    if isinstance(error, UpstreamRejected):
        return error.status == 429
    return True


def feedback_key(key_id: str, request_id: str) -> str:
    """The id a call's routing choice is remembered under: only the API key
    that made the call can score it."""
    return f"{key_id}\x1f{request_id}"


def make_stage(settings: RoutingSettings) -> RoutingStage:
    """The stage for ``settings`` (tracking calls in flight only when needed)."""
    uses_inflight = settings.balance == "least_inflight" or any(
        b == "least_inflight" for b in settings.model_balance.values()
    )
    return TrackingRoutingStage(settings) if uses_inflight else RoutingStage(settings)
