"""Which budgets and rate limits apply to a call, and under which keys.

A budget counts spend under a key naming its scope, whom it counts, its
period and the period's start: ``team:alpha:month:2026-11``,
``gateway:all:day:2026-11-28``, ``user:u%3A42:none:all`` (ids are
percent-encoded, so ``:`` and ``*`` in them cannot collide). Two rules that
count the same thing in the same period share the key (and the smaller
limit wins). Periods are calendar periods in UTC.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

from veil import Principal

from .settings import BudgetRule, Period, RateLimitRule
from .store import NANO, Bucket, Counter

__all__ = ["Applied", "applicable", "counter_key", "period_end", "period_stamp", "rate_buckets"]


@dataclass(frozen=True, slots=True)
class Applied:
    """A budget rule as it applies to one call."""

    rule: BudgetRule
    counter: Counter
    soft: int | None
    """The soft limit in nano-dollars, if any."""


def period_stamp(period: Period, now: dt.datetime) -> str:
    """The start of ``now``'s period: ``2026-11-28T10``, ``2026-11-28``,
    ``2026-W48``, ``2026-11``, or ``all``."""
    if period == "hour":
        return now.strftime("%Y-%m-%dT%H")
    if period == "day":
        return now.strftime("%Y-%m-%d")
    if period == "week":
        year, week, _ = now.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return now.strftime("%Y-%m")
    return "all"


def period_end(period: Period, now: dt.datetime) -> dt.datetime | None:
    """When ``now``'s period ends (UTC), ``None`` for ``none``."""
    if period == "hour":
        return now.replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=1)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day + dt.timedelta(days=1)
    if period == "week":
        return day + dt.timedelta(days=7 - now.weekday())
    if period == "month":
        first = day.replace(day=1)
        return (first + dt.timedelta(days=32)).replace(day=1)
    return None


def _who(rule: BudgetRule | RateLimitRule, principal: Principal) -> str | None:
    """The id the rule counts for this caller, or ``None`` when it does not apply."""
    if rule.scope == "gateway":
        return "all"
    actual = {"team": principal.team, "key": principal.key_id, "user": principal.user}[rule.scope]
    if actual is None or (rule.id != "*" and rule.id != actual):
        return None
    return actual


def counter_key(scope: str, who: str, period: Period, stamp: str) -> str:
    """The storage key of one budget in one period (see the module doc)."""
    return f"{scope}:{quote(who, safe='')}:{period}:{stamp}"


def applicable(
    rules: Iterable[BudgetRule], principal: Principal, now: dt.datetime
) -> list[Applied]:
    """The budgets that count this caller's spend, with their keys for ``now``."""
    out = []
    for rule in rules:
        who = _who(rule, principal)
        if who is None:
            continue
        key = counter_key(rule.scope, who, rule.period, period_stamp(rule.period, now))
        soft = None if rule.soft_limit_usd is None else round(rule.soft_limit_usd * NANO)
        out.append(Applied(rule, Counter(key, round(rule.limit_usd * NANO)), soft))
    return out


def rate_buckets(
    rules: Iterable[RateLimitRule], principal: Principal, tokens: int
) -> list[tuple[RateLimitRule, str, Bucket]]:
    """The rate-limit buckets this call takes from: ``(rule, "requests" or
    "tokens", bucket)``; a token bucket takes ``tokens``."""
    out = []
    for rule in rules:
        who = _who(rule, principal)
        if who is None:
            continue
        base = f"{rule.scope}:{quote(who, safe='')}"
        if rule.rpm is not None:
            out.append((rule, "requests", Bucket(f"rpm:{base}", rule.rpm, 1)))
        if rule.tpm is not None:
            out.append((rule, "tokens", Bucket(f"tpm:{base}", rule.tpm, tokens)))
    return out
