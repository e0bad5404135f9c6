"""``veil budget``: spend reports and period resets, from the command line.

The store is the one the policy's ``[budget]`` section names (the SQLite file
under ``--state-dir``, or Redis at the URL in its environment variable).
Both commands work while gateways are serving: a report reads, a reset
changes committed spend, which gateways see within a quarter of a second.

Exit codes: 0 done, 2 usage error, 3 the store cannot be read, 4 the policy
cannot be read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import click
from pydantic import ValidationError

from .redis_outbox import Waiting, waiting
from .report import DIMENSIONS, summarize
from .rules import period_stamp
from .settings import BudgetSettings
from .store import NANO, SpendRow

__all__ = ["budget"]

_POLICY = click.option(
    "--policy",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="VEIL_POLICY",
    required=True,
    help="The policy whose [budget] section names the store (env VEIL_POLICY).",
)
_STATE = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="VEIL_STATE_DIR",
    default=None,
    help=(
        "The gateway's state directory, where a relative sqlite_path lives and a Redis "
        "store's outboxes (env VEIL_STATE_DIR)."
    ),
)


class PolicyUnreadable(click.ClickException):
    """The policy file or its ``[budget]`` section cannot be read: exit 4."""

    exit_code = 4


def _settings(policy: Path) -> BudgetSettings:
    try:
        document = tomllib.loads(policy.read_text(encoding="utf-8"))
        return BudgetSettings.model_validate(document.get("budget", {}))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PolicyUnreadable(f"cannot read the policy {policy}: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PolicyUnreadable(f"{policy}: [budget] {where}: {first['msg']}") from None


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


async def _with_store(settings: BudgetSettings, state_dir: Path | None, work: Any) -> Any:
    """Run ``work(report, reset)`` against the store without taking it over
    (a serving gateway may hold it)."""
    if settings.store == "redis":
        url = os.environ.get(settings.redis_url_env)
        if not url:
            _fail(3, f"set ${settings.redis_url_env} to the Redis URL of the budget store")
        from .redis_store import RedisStore

        store = RedisStore(url)
        try:
            return await work(store.report, store.reset)
        finally:
            await store.close()
    from .sqlite_store import connect, journal_path, read_report, reset_counters
    from .stage import sqlite_path

    path = sqlite_path(settings, state_dir)
    try:
        db = connect(path, readonly=False) if path.exists() else None
    except OSError as e:
        _fail(3, f"cannot open the budget store {path}: {e}")
    if db is None:
        _fail(3, f"no budget store at {path}; pass the gateway's --state-dir")

    async def report(since: str | None) -> list[SpendRow]:
        return read_report(db, since, journal_path(path))

    async def reset(pattern: str) -> int:
        return reset_counters(db, pattern)

    try:
        return await work(report, reset)
    finally:
        db.close()


@click.group(name="budget")
def budget() -> None:
    """Spend by team, key, user and model; reset a budget's period.

    \b
    Examples:
      veil budget report --policy policy.toml --state-dir /var/lib/veil
      veil budget report --since 2026-11-01 --team research --json
      veil budget reset --scope team --id research --yes
    """


@budget.command()
@_POLICY
@_STATE
@click.option("--since", help="First day to include, YYYY-MM-DD (default: everything).")
@click.option("--team", help="Only this team's spend.")
@click.option(
    "--by",
    default=",".join(DIMENSIONS),
    show_default=True,
    help="Comma-separated groupings: team, key, user, model.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def report(
    policy: Path,
    state_dir: Path | None,
    since: str | None,
    team: str | None,
    by: str,
    as_json: bool,
) -> None:
    """Settled spend, summed by team, key, user and model."""
    if since is not None:
        try:
            dt.date.fromisoformat(since)
        except ValueError:
            raise click.BadParameter("use YYYY-MM-DD", param_hint="--since") from None
    dims = [d for d in by.split(",") if d]
    if not dims or any(d not in DIMENSIONS for d in dims):
        raise click.BadParameter(f"list of {', '.join(DIMENSIONS)}", param_hint="--by")
    settings = _settings(policy)

    async def work(read: Any, _: Any) -> Any:
        return await read(since)

    try:
        rows = asyncio.run(_with_store(settings, state_dir, work))
    except OSError as e:
        _fail(3, f"cannot reach the budget store: {e}")
    summary = summarize(rows, dims, team)
    directory = state_dir or Path(".")
    held = _outbox_waiting(directory, since, team) if settings.store == "redis" else None
    if as_json:
        extra = {"outbox": _outbox_doc(held)} if held is not None else {}
        click.echo(json.dumps({"since": since, "team": team, **summary, **extra}, indent=2))
        return
    click.echo(
        f"spend since {since or 'the start'}{f' (team {team})' if team else ''}: "
        f"${summary['total_usd']:.6f} in {summary['calls']} calls "
        f"({summary['prompt_tokens']} prompt + {summary['completion_tokens']} completion tokens)"
    )
    if held is not None and held.calls:
        click.echo(
            f"not yet in Redis: ${held.cost / NANO:.6f} of {held.calls} calls in {held.files} "
            f"outbox file(s) under {directory}, not counted above (a gateway "
            "that starts with this state directory sends them; some may already be in)"
        )
    for dim in dims:
        click.echo(f"\nby {dim}:")
        entries = summary[f"by_{dim}"] or [{dim: "-", "cost_usd": 0.0, "calls": 0}]
        width = max(len(str(entry[dim] or "(none)")) for entry in entries)
        for entry in entries:
            name = str(entry[dim] or "(none)")
            click.echo(f"  {name:<{width}}  ${entry['cost_usd']:>14.6f}  {entry['calls']:>8} calls")


def _outbox_waiting(directory: Path, since: str | None, team: str | None) -> Waiting:
    """What the Redis store's outboxes in ``directory`` hold unacknowledged
    (none when ``since`` is after today: Redis records them as of today)."""
    today = dt.datetime.now(dt.UTC).date().isoformat()
    if not directory.is_dir() or (since is not None and since > today):
        return Waiting(0, 0, 0)
    try:
        return waiting(directory, team)
    except OSError as e:
        _fail(3, f"cannot read the budget outboxes in {directory}: {e}")


def _outbox_doc(held: Waiting) -> dict[str, Any]:
    return {"calls": held.calls, "usd": held.cost / NANO, "files": held.files}


@budget.command()
@_POLICY
@_STATE
@click.option(
    "--scope",
    type=click.Choice(["gateway", "team", "key", "user"]),
    required=True,
    help="Whose budget.",
)
@click.option("--id", "who", help="The team, key or user id (default: every one).")
@click.option(
    "--period",
    type=click.Choice(["hour", "day", "week", "month", "none"]),
    help="Which period kind (default: each kind the policy's budgets of that scope use).",
)
@click.option("--yes", is_flag=True, help="Do it without asking.")
def reset(
    policy: Path,
    state_dir: Path | None,
    scope: str,
    who: str | None,
    period: str | None,
    yes: bool,
) -> None:
    """Set the spend of a budget's current period to zero.

    Reservations of calls in flight stay; serving gateways see the reset
    within a quarter of a second.
    """
    settings = _settings(policy)
    periods = (
        [period] if period else sorted({r.period for r in settings.budgets if r.scope == scope})
    )
    if not periods:
        raise click.UsageError(f"the policy has no {scope} budget; pass --period to reset anyway")
    now = dt.datetime.now(dt.UTC)
    ident = "all" if scope == "gateway" else (quote(who, safe="") if who else "*")
    patterns = [f"{scope}:{ident}:{p}:{period_stamp(p, now)}" for p in periods]  # type: ignore[arg-type]
    if not yes:
        click.confirm(f"reset the spend of {', '.join(patterns)}?", abort=True)

    async def work(_: Any, zero: Any) -> int:
        return sum([await zero(p) for p in patterns])

    try:
        count = asyncio.run(_with_store(settings, state_dir, work))
    except OSError as e:
        _fail(3, f"cannot reach the budget store: {e}")
    click.echo(f"reset {count} budget period(s): {', '.join(patterns)}")
