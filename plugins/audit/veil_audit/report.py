"""Compliance reports from audit files: what left, for whom, at what cost,
under which signed policy.

:func:`read_records` reads call records from files or directories;
:func:`summarize` aggregates them (spend by team, key and model, per day;
PII detections by type and action; refusals and errors; policy versions in
force); :func:`render_text` prints the summary. The HTML report is in
:mod:`veil_audit.html`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from .files import chain_files

__all__ = ["audit_files", "parse_since", "read_records", "render_text", "summarize"]

_SINCE = re.compile(r"(\d+)([dhm])")


def parse_since(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """``7d``, ``24h``, ``30m`` (before ``now``) or a date / ISO time (UTC).

    :raises ValueError: anything else.
    """
    now = now or dt.datetime.now(dt.UTC)
    m = _SINCE.fullmatch(value.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return now - dt.timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[unit]: n})
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"{value!r} is not a duration (7d, 24h, 30m) or a date (2026-11-01)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def audit_files(paths: Iterable[Path]) -> list[Path]:
    """Files named directly, and the audit files of directories, in chain order."""
    out: list[Path] = []
    for p in paths:
        out.extend(chain_files(p) if p.is_dir() else [p])
    return out


def read_records(
    files: Iterable[Path], stats: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """Every ``call`` record of ``files``; unreadable lines are counted in
    ``stats["unreadable"]`` (``veil audit verify`` says what is wrong)."""
    for path in files:
        with path.open("rb") as f:
            for line in f:
                if line[:1] == b"\0":  # the unwritten space of an active file
                    break
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    if stats is not None:
                        stats["unreadable"] = stats.get("unreadable", 0) + 1
                    continue
                if isinstance(record, dict) and record.get("event") == "call":
                    yield record


def _add(table: dict[str, Any], key: str, cost: float, calls: int = 1) -> None:
    row = table.setdefault(key, {"cost_usd": 0.0, "calls": 0, "tokens_in": 0, "tokens_out": 0})
    row["cost_usd"] += cost
    row["calls"] += calls


def summarize(
    records: Iterable[dict[str, Any]], since: dt.datetime | None = None, team: str | None = None
) -> dict[str, Any]:
    """Aggregate call records at or after ``since`` (of ``team`` only, if given)."""
    start = since.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S") if since else ""
    by: dict[str, dict[str, Any]] = {"team": {}, "key": {}, "model": {}}
    daily: dict[str, dict[str, float]] = {}
    pii: dict[str, dict[str, int]] = {}
    errors: dict[str, int] = {}
    refusals: dict[str, int] = {}
    policies: dict[tuple[Any, ...], dict[str, Any]] = {}
    cache: dict[str, int] = {}
    total = {"calls": 0, "cost_usd": 0.0, "tokens_in": 0, "tokens_out": 0, "errors": 0}
    failovers = 0
    first = last = None
    for r in records:
        ts = r.get("timestamp", "")
        if ts < start:
            continue
        principal = r.get("principal") or {}
        if team is not None and principal.get("team") != team:
            continue
        cost = float(r.get("cost_usd") or 0.0)
        tin, tout = int(r.get("tokens_in") or 0), int(r.get("tokens_out") or 0)
        model = r.get("deployment") or r.get("model") or "(none)"
        for dim, key in (
            ("team", principal.get("team")), ("key", principal.get("key_id")), ("model", model)
        ):  # fmt: skip
            _add(by[dim], str(key), cost)
            by[dim][str(key)]["tokens_in"] += tin
            by[dim][str(key)]["tokens_out"] += tout
        day = ts[:10]
        per_day = daily.setdefault(day, {})
        per_day[str(principal.get("team"))] = per_day.get(str(principal.get("team")), 0.0) + cost
        for kind, actions in (r.get("pii") or {}).items():
            slot = pii.setdefault(kind, {})
            for action, n in actions.items():
                slot[action] = slot.get(action, 0) + int(n)
        status = int(r.get("status") or 0)
        if status >= 400:
            err = r.get("error") or {}
            label = f"{status} {err.get('code') or err.get('type') or 'error'}"
            errors[label] = errors.get(label, 0) + 1
            total["errors"] += 1
        budget = r.get("budget") or {}
        if budget.get("action") == "refused":
            reason = str(budget.get("reason") or "budget")
            refusals[reason] = refusals.get(reason, 0) + 1
        if r.get("cache"):
            cache[r["cache"]] = cache.get(r["cache"], 0) + 1
        failovers += int(r.get("failovers") or 0)
        pol = r.get("policy") or {}
        pkey = (pol.get("version"), pol.get("sha256"), pol.get("signed_by"))
        entry = policies.setdefault(
            pkey,
            {
                "version": pol.get("version"),
                "sha256": pol.get("sha256"),
                "signed_by": pol.get("signed_by"),
                "issuer": pol.get("issuer"),
                "first_seen": ts,
                "last_seen": ts,
                "calls": 0,
            },
        )
        entry["calls"] += 1
        entry["first_seen"] = min(entry["first_seen"], ts)
        entry["last_seen"] = max(entry["last_seen"], ts)
        total["calls"] += 1
        total["cost_usd"] += cost
        total["tokens_in"] += tin
        total["tokens_out"] += tout
        first = ts if first is None else min(first, ts)
        last = ts if last is None else max(last, ts)

    def ranked(table: dict[str, Any], name: str) -> list[dict[str, Any]]:
        rows = [{name: k, **v} for k, v in table.items()]
        return sorted(rows, key=lambda row: (-row["cost_usd"], -row["calls"], str(row[name])))

    return {
        "since": since.isoformat() if since else None,
        "team": team,
        "first_call": first,
        "last_call": last,
        "totals": total,
        "failovers": failovers,
        "by_team": ranked(by["team"], "team"),
        "by_key": ranked(by["key"], "key"),
        "by_model": ranked(by["model"], "model"),
        "daily": [{"day": d, "by_team": daily[d]} for d in sorted(daily)],
        "pii": dict(sorted(pii.items())),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "budget_refusals": refusals,
        "cache": cache,
        "policies": sorted(policies.values(), key=lambda p: (p["first_seen"], p["version"] or 0)),
    }


def render_text(summary: dict[str, Any], integrity: str) -> str:
    """The summary as plain text (for a terminal)."""
    t = summary["totals"]
    scope = f" for team {summary['team']}" if summary["team"] else ""
    lines = [
        f"veil audit report{scope}, since {summary['since'] or 'the first record'}",
        f"integrity: {integrity}",
        "",
        f"{t['calls']} calls, ${t['cost_usd']:.6f}, {t['tokens_in']} tokens in, "
        f"{t['tokens_out']} tokens out, {t['errors']} refused or failed, "
        f"{summary['failovers']} failovers",
    ]
    for dim in ("team", "key", "model"):
        rows = summary[f"by_{dim}"]
        lines += ["", f"spend by {dim}:"]
        if not rows:
            lines.append("  (none)")
        width = max((len(str(r[dim])) for r in rows), default=0)
        for r in rows:
            lines.append(
                f"  {str(r[dim]):<{width}}  ${r['cost_usd']:>12.6f}  {r['calls']:>7} calls  "
                f"{r['tokens_in']:>9} in  {r['tokens_out']:>9} out"
            )
    lines += ["", "personal data found (by type and action):"]
    lines += [
        f"  {kind:<20} " + ", ".join(f"{a} {n}" for a, n in sorted(actions.items()))
        for kind, actions in summary["pii"].items()
    ] or ["  (none)"]
    lines += ["", "refused or failed calls:"]
    lines += [f"  {label:<40} {n:>7}" for label, n in summary["errors"].items()] or ["  (none)"]
    if summary["cache"]:
        lines += [
            "",
            "cache: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["cache"].items())),
        ]
    lines += ["", "policies in force:"]
    for p in summary["policies"]:
        lines.append(
            f"  version {p['version']}  sha256 {str(p['sha256'])[:16]}  signed by key "
            f"{p['signed_by']}  {p['first_seen'][:19]} .. {p['last_seen'][:19]}  {p['calls']} calls"
        )
    if not summary["policies"]:
        lines.append("  (none)")
    return "\n".join(lines)
