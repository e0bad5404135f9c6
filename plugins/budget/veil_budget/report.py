"""Spend reports: ``GET /admin/spend`` and ``veil budget report``.

Both read the store's daily spend rows and sum them by team, key, user and
model; the endpoint also lists each budget of the policy in its current
period (spent, reserved, remaining).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from .rules import applicable
from .settings import BudgetSettings
from .store import NANO, SpendRow, Store

__all__ = ["DIMENSIONS", "budget_status", "spend_endpoint", "summarize"]

DIMENSIONS = ("team", "key", "user", "model")
_FIELD = {"team": "team", "key": "key_id", "user": "user", "model": "model"}
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def summarize(
    rows: Iterable[SpendRow], by: Iterable[str] = DIMENSIONS, team: str | None = None
) -> dict[str, Any]:
    """Totals and per-dimension sums of ``rows`` (only ``team``'s when given),
    costs in USD, each list sorted by cost, highest first."""
    rows = [r for r in rows if team is None or r.team == team]
    out: dict[str, Any] = {
        "total_usd": round(sum(r.cost for r in rows) / NANO, 6),
        "calls": sum(r.calls for r in rows),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
    }
    for dim in by:
        groups: dict[str, list[int]] = {}
        for r in rows:
            g = groups.setdefault(getattr(r, _FIELD[dim]), [0, 0, 0, 0])
            g[0] += r.cost
            g[1] += r.calls
            g[2] += r.prompt_tokens
            g[3] += r.completion_tokens
        out[f"by_{dim}"] = [
            {
                dim: name if name or dim != "user" else None,
                "cost_usd": round(cost / NANO, 6),
                "calls": calls,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
            }
            for name, (cost, calls, prompt, completion) in sorted(
                groups.items(), key=lambda item: (-item[1][0], item[0])
            )
        ]
    return out


async def budget_status(
    store: Store, settings: BudgetSettings, teams: Iterable[str], keys: Iterable[str]
) -> list[dict[str, Any]]:
    """Each budget of the policy in its current period, for the policy's teams
    and keys (user budgets: only those naming a user)."""
    from veil import Principal

    now = dt.datetime.now(dt.UTC)
    seen: dict[str, dict[str, Any]] = {}
    callers = {
        "gateway": [Principal("", "")],
        "team": [Principal("", team) for team in teams],
        "key": [Principal(key, "") for key in keys],
    }
    for rule in settings.budgets:
        if rule.scope == "user":
            who = [Principal("", "", user=rule.id)] if rule.id != "*" else []
        else:
            who = callers[rule.scope]
        for principal in who:
            for applied in applicable([rule], principal, now):
                if applied.counter.key in seen:
                    continue
                seen[applied.counter.key] = {
                    "budget": rule.name,
                    "key": applied.counter.key,
                    "limit_usd": rule.limit_usd,
                    "soft_limit_usd": rule.soft_limit_usd,
                }
    totals = await store.spent(list(seen))
    for key, entry in seen.items():
        spent, reserved = totals[key]
        limit = round(entry["limit_usd"] * NANO)
        entry["spent_usd"] = round(spent / NANO, 6)
        entry["reserved_usd"] = round(reserved / NANO, 6)
        entry["remaining_usd"] = round(max(0, limit - spent - reserved) / NANO, 6)
    return list(seen.values())


async def spend_endpoint(request: Request) -> JSONResponse:
    """``GET /admin/spend?since=YYYY-MM-DD&team=T&by=team,model``."""
    from . import stages

    runtime = request.state.runtime
    found = stages(runtime)
    if not found or found[0].store is None:
        return _error(404, "the budget plugin is not running in this policy", "not_found")
    stage = found[0]
    since = request.query_params.get("since")
    if since is not None and not _DAY.fullmatch(since):
        return _error(400, "since must be a day, YYYY-MM-DD", "invalid_since", "since")
    by = [d for d in (request.query_params.get("by") or ",".join(DIMENSIONS)).split(",") if d]
    unknown = [d for d in by if d not in DIMENSIONS]
    if unknown:
        return _error(
            400, f"by must list {', '.join(DIMENSIONS)}; got {unknown[0]!r}", "invalid_by", "by"
        )
    team = request.query_params.get("team")
    assert stage.store is not None
    rows = await stage.store.report(since)
    body = {"object": "spend_report", "since": since, "team": team, **summarize(rows, by, team)}
    policy = runtime.policy
    keys = sorted({p.key_id for p in policy.keys.values()})
    body["budgets"] = await budget_status(stage.store, stage.settings, policy.teams, keys)
    return JSONResponse(body)


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status == 400 else "not_found_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status
    )
