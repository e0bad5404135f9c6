"""The policy's ``[routing]`` section, validated.

Example::

    [routing]
    balance = "round_robin"            # round_robin | least_inflight | latency
    strategy = "balanced"              # quality | balanced | cost | floor:0.7 (pools)

    [routing.aliases.fast]             # a name clients use -> models, in failover order
    targets = ["gpt-4o-mini", "gpt-4o"]
    weights = [80, 20]                 # optional: weighted split of the first choice

    [[routing.rules]]                  # first match wins
    teams = ["support"]
    keywords = ["refund", "invoice"]
    route = "fast"

    [routing.models."gpt-4o-mini"]     # capabilities (default: everything supported)
    tools = true
    json_mode = false

    [routing.breaker]
    failures = 5                       # open after 5 failures ...
    window_s = 30                      # ... within 30 seconds
    cooldown_s = 15                    # then one probe call after 15 seconds

Every value a policy gets wrong (an unknown strategy, a regex that does not
compile, weights that do not match the targets, a pool without a router) makes
the policy invalid, with the field named. Names that must exist in the policy
(deployments, teams) are checked at start-up (:func:`check_against_policy`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from veil.errors import PolicyError
from veil.policy.model import Policy

from .strategy import Strategy, parse_strategy

__all__ = [
    "AliasSettings",
    "Balance",
    "BreakerSettings",
    "FeedbackSettings",
    "ModelSettings",
    "OutputBudgetSettings",
    "PoolSettings",
    "RouterSettings",
    "RoutingSettings",
    "RuleSettings",
    "StrategyBars",
    "check_against_policy",
]

Balance = Literal["round_robin", "least_inflight", "latency"]
"""How the deployments of one model share its calls: in turn, to the one with
the fewest calls in flight, or to the lowest moving-average latency."""

_Name = Annotated[str, Field(min_length=1, max_length=200)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _strategy(value: str | None) -> str | None:
    if value is not None:
        parse_strategy(value)  # raises ValueError with the accepted forms
    return value


class AliasSettings(_Strict):
    """A name clients use, mapped to policy model names tried in order.

    With ``weights``, the first model is picked at random in those
    proportions, and the others follow it as failover, in listed order."""

    targets: Annotated[list[_Name], Field(min_length=1)]
    weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None

    @model_validator(mode="after")
    def _weights_match(self) -> AliasSettings:
        if self.weights is not None:
            if len(self.weights) != len(self.targets):
                raise ValueError(
                    f"weights has {len(self.weights)} entries for {len(self.targets)} targets; "
                    "give one weight per target"
                )
            if sum(self.weights) <= 0:
                raise ValueError("weights must not all be 0")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets lists a model twice")
        return self


class RuleSettings(_Strict):
    """Route calls that match every given condition to ``route`` (a model, an
    alias or a pool). Conditions: the requested model (``models``), the
    caller's team (``teams``), any of the key's tags (``key_tags``), request
    ``metadata`` values (all must be equal), and the last user message's
    (already redacted) text: a ``pattern`` (regex, searched) or any of
    ``keywords`` (whole words, case-insensitive). A rule with no condition
    matches every call. ``strategy`` applies when ``route`` is a pool."""

    id: _Name | None = None
    models: list[_Name] = []
    teams: list[_Name] = []
    key_tags: list[_Name] = []
    metadata: dict[str, str] = {}
    pattern: Annotated[str, Field(min_length=1, max_length=2000)] | None = None
    keywords: list[Annotated[str, Field(min_length=1, max_length=200)]] = []
    route: _Name
    strategy: str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"pattern is not a valid regular expression: {e}") from None
        return v

    _check_strategy = field_validator("strategy")(_strategy)


class PoolSettings(_Strict):
    """Models a learned router chooses among, by strategy (the cheapest whose
    predicted quality clears the strategy's bar)."""

    models: Annotated[list[_Name], Field(min_length=1)]
    strategy: str | None = None

    _check_strategy = field_validator("strategy")(_strategy)


class RouterSettings(_Strict):
    """The learned router's artifact (relative to the policy file) and the
    SHA-256 the policy pins: a different file is refused at start-up.
    ``models`` maps policy model names to the router's names where they differ."""

    artifact: Annotated[str, Field(min_length=1)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    models: dict[str, _Name] = {}


class ModelSettings(_Strict):
    """What a model (every deployment of that name) can do. Unlisted models
    support everything; ``context_window`` overrides the deployment's."""

    tools: bool = True
    json_mode: bool = True
    reasoning: bool = False
    context_window: Annotated[int, Field(gt=0)] | None = None


class BreakerSettings(_Strict):
    """A circuit breaker per deployment: open after ``failures`` failed attempts
    (429, 5xx, timeouts, connect errors) within ``window_s`` seconds; after
    ``cooldown_s`` one probe call may go (half-open): success closes it,
    failure opens it again. ``enabled = false`` turns breakers off."""

    enabled: bool = True
    failures: Annotated[int, Field(ge=1, le=10_000)] = 5
    window_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 30.0
    cooldown_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 15.0


class StrategyBars(_Strict):
    """Each strategy's bar, as a share of the best predicted quality among the
    pool's models for the prompt: ``balanced = 0.9`` picks the cheapest model
    predicted to reach 90% of the best model's quality."""

    quality: Annotated[float, Field(gt=0, le=1)] = 1.0
    balanced: Annotated[float, Field(gt=0, le=1)] = 0.9
    cost: Annotated[float, Field(gt=0, le=1)] = 0.75

    @model_validator(mode="after")
    def _ordered(self) -> StrategyBars:
        if not self.cost <= self.balanced <= self.quality:
            raise ValueError("bars must satisfy cost <= balanced <= quality")
        return self


class OutputBudgetSettings(_Strict):
    """When the client set no ``max_tokens``, cap the answer at the router's
    predicted length for the chosen model times ``margin`` (within
    ``min_tokens``..``max_tokens``); with ``reasoning_effort``, also set
    ``reasoning_effort`` for reasoning models (``low`` under ``low_below``
    predicted tokens, ``medium`` under ``medium_below``, else ``high``)."""

    enabled: bool = False
    margin: Annotated[float, Field(ge=1, le=10)] = 1.5
    min_tokens: Annotated[int, Field(ge=1)] = 64
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    reasoning_effort: bool = False
    low_below: Annotated[int, Field(ge=1)] = 256
    medium_below: Annotated[int, Field(ge=1)] = 1024

    @model_validator(mode="after")
    def _ordered(self) -> OutputBudgetSettings:
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError("max_tokens must be at least min_tokens")
        if self.medium_below <= self.low_below:
            raise ValueError("medium_below must be above low_below")
        return self


class FeedbackSettings(_Strict):
    """Learning from experience (off by default): ``POST /v1/feedback`` scores
    and observed errors update per-(prompt cluster, model) estimates that
    adjust the router's predictions; kept under the gateway's state directory."""

    enabled: bool = False
    prior_weight: Annotated[float, Field(gt=0, le=10_000)] = 5.0


class RoutingSettings(_Strict):
    """The whole ``[routing]`` section (every key optional)."""

    balance: Balance = "round_robin"
    model_balance: dict[str, Balance] = {}
    ewma_alpha: Annotated[float, Field(gt=0, le=1)] = 0.3
    chars_per_token: Annotated[float, Field(gt=0.5, le=16)] = 4.0
    strategy: str = "balanced"
    team_strategies: dict[str, str] = {}
    aliases: dict[str, AliasSettings] = {}
    rules: list[RuleSettings] = []
    pools: dict[str, PoolSettings] = {}
    router: RouterSettings | None = None
    models: dict[str, ModelSettings] = {}
    breaker: BreakerSettings = BreakerSettings()
    bars: StrategyBars = StrategyBars()
    output_budget: OutputBudgetSettings = OutputBudgetSettings()
    feedback: FeedbackSettings = FeedbackSettings()

    @field_validator("strategy")
    @classmethod
    def _default_strategy(cls, v: str) -> str:
        parse_strategy(v)
        return v

    @field_validator("team_strategies")
    @classmethod
    def _team_strategies(cls, v: dict[str, str]) -> dict[str, str]:
        for team, value in v.items():
            try:
                parse_strategy(value)
            except ValueError as e:
                raise ValueError(f"team {team!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RoutingSettings:
        clash = set(self.aliases) & set(self.pools)
        if clash:
            raise ValueError(f"{sorted(clash)[0]!r} is both an alias and a pool; rename one")
        if self.pools and self.router is None:
            raise ValueError(
                "pools need a learned router: add [routing.router] with artifact and sha256 "
                "(`veil route train` writes one and prints its sha256)"
            )
        if (self.output_budget.enabled or self.feedback.enabled) and self.router is None:
            raise ValueError(
                "output_budget and feedback use the learned router's predictions: add "
                "[routing.router] or turn them off"
            )
        return self

    def default_strategy(self, team: str) -> Strategy:
        """The team's strategy, else the policy's."""
        return parse_strategy(self.team_strategies.get(team, self.strategy))


def check_against_policy(settings: RoutingSettings, policy: Policy) -> None:
    """Check the names the section uses against the policy: alias and pool
    members and rule routes must be policy models (or aliases / pools), teams
    must exist.

    :raises PolicyError: naming the field and the unknown name.
    """
    models = set(policy.models)
    for name in (*settings.aliases, *settings.pools):
        if name in models:
            raise PolicyError(
                f"[routing] {name!r} is both a policy model and an alias or pool; rename it"
            )
    for name, alias in settings.aliases.items():
        for target in alias.targets:
            if target not in models:
                raise PolicyError(
                    f"[routing.aliases.{name}] targets names {target!r}, which is not a "
                    "deployment name of the policy"
                )
    for name, pool in settings.pools.items():
        for target in pool.models:
            if target not in models:
                raise PolicyError(
                    f"[routing.pools.{name}] models names {target!r}, which is not a "
                    "deployment name of the policy"
                )
    routes = models | set(settings.aliases) | set(settings.pools)
    for i, rule in enumerate(settings.rules):
        where = f"[[routing.rules]] #{i + 1}" + (f" ({rule.id})" if rule.id else "")
        if rule.route not in routes:
            raise PolicyError(
                f"{where}: route {rule.route!r} is neither a deployment, an alias nor a pool"
            )
        for team in rule.teams:
            if team not in policy.teams:
                raise PolicyError(f"{where}: teams names {team!r}, which [[teams]] lacks")
    for team in settings.team_strategies:
        if team not in policy.teams:
            raise PolicyError(f"[routing] team_strategies names {team!r}, which [[teams]] lacks")
    for name in (*settings.models, *settings.model_balance):
        if name not in models:
            raise PolicyError(
                f"[routing] models/model_balance names {name!r}, which is not a deployment "
                "name of the policy"
            )
