"""The policy's ``[budget]`` section, validated.

Example::

    [budget]
    store = "sqlite"                 # or "redis" for several gateway replicas
    default_max_tokens = 4096        # output cap set on calls that ask for none

    [[budget.budgets]]               # every team: at most $200 a month
    scope = "team"
    period = "month"
    limit_usd = 200
    soft_limit_usd = 150             # logged, counted, reported in a header

    [[budget.budgets]]               # the whole gateway: $50 a day, $0.50 a call
    scope = "gateway"
    period = "day"
    limit_usd = 50
    max_call_usd = 0.5

    [[budget.rate_limits]]           # every key: 60 requests, 100k tokens a minute
    scope = "key"
    rpm = 60
    tpm = 100000

A rule with ``id = "*"`` (the default) applies to each team, key or user on
its own; a rule with an id applies to that one only. Values a policy gets
wrong (a negative limit, an unknown period, a soft limit above the hard one)
make the policy invalid, with the field named.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["BudgetRule", "BudgetSettings", "Period", "RateLimitRule", "Scope"]

Period = Literal["hour", "day", "week", "month", "none"]
"""Calendar periods in UTC (weeks start on Monday); ``none`` never resets."""

Scope = Literal["gateway", "team", "key", "user"]
"""Whose spend a budget counts: all calls, a team's, an API key's, or an end
user's (the request's ``user`` field; calls without one are not counted)."""

_Usd = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetRule(_Strict):
    """A hard limit on spend in a period, with an optional soft limit and
    per-call cap (all in USD)."""

    scope: Scope
    id: Annotated[str, Field(min_length=1)] = "*"
    period: Period = "month"
    limit_usd: _Usd
    soft_limit_usd: _Usd | None = None
    max_call_usd: _Usd | None = None

    @model_validator(mode="after")
    def _consistent(self) -> BudgetRule:
        if self.scope == "gateway" and self.id != "*":
            raise ValueError("a gateway budget has no id (it counts every call)")
        if self.soft_limit_usd is not None and self.soft_limit_usd >= self.limit_usd:
            raise ValueError("soft_limit_usd must be below limit_usd")
        if self.max_call_usd is not None and self.max_call_usd > self.limit_usd:
            raise ValueError("max_call_usd must not exceed limit_usd")
        return self

    @property
    def name(self) -> str:
        """How messages and headers name it: ``team budget (month)``,
        ``key budget of ci-bot (day)``."""
        who = "" if self.id == "*" else f" of {self.id}"
        return f"{self.scope} budget{who} ({self.period})"


class RateLimitRule(_Strict):
    """Requests and/or tokens per minute for each key or team (or one of them)."""

    scope: Literal["key", "team"]
    id: Annotated[str, Field(min_length=1)] = "*"
    rpm: Annotated[int, Field(gt=0)] | None = None
    tpm: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimitRule:
        if self.rpm is None and self.tpm is None:
            raise ValueError("a rate limit needs rpm, tpm or both")
        return self


class BudgetSettings(_Strict):
    """The ``[budget]`` section.

    :param store: ``sqlite`` (one gateway process; a file, durable across
        crashes) or ``redis`` (several replicas share one Redis).
    :param sqlite_path: the SQLite file; relative paths are under the
        gateway's state directory (``VEIL_STATE_DIR``), else the working
        directory.
    :param redis_url_env: the environment variable holding the Redis URL
        (never put credentials in a policy).
    :param default_max_tokens: the output cap set on a call that asks for
        none, so that its worst case is known and bounded.
    :param image_tokens: tokens reserved for each image part of a prompt.
    :param reservation_ttl_s: a reservation not settled by then (its gateway
        died mid-call) is released; keep it above the longest call.
    :param lease_calls: Redis store only: while a budget has plenty of room, a
        replica leases this many calls' worst case of it (and of the caller's
        rate limits) and serves those calls without a round trip to Redis
        each; 0 turns leasing off (see :mod:`veil_budget.redis_lease`).
    :param lease_headroom: a lease is taken or topped up only while every
        budget and rate limit it draws from has room for this many times the
        lease; closer to a limit, every call is checked in Redis on its own.
    """

    store: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: Annotated[str, Field(min_length=1)] = "veil-budget.sqlite3"
    redis_url_env: Annotated[str, Field(min_length=1)] = "VEIL_BUDGET_REDIS_URL"
    default_max_tokens: Annotated[int, Field(gt=0)] = 4096
    image_tokens: Annotated[int, Field(ge=0)] = 1600
    reservation_ttl_s: Annotated[float, Field(gt=0)] = 900.0
    lease_calls: Annotated[int, Field(ge=0, le=1000)] = 16
    lease_headroom: Annotated[int, Field(ge=2)] = 20
    budgets: list[BudgetRule] = []
    rate_limits: list[RateLimitRule] = []
