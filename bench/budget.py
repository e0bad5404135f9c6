"""Budget scenario: the CPU the ``budget`` stage adds to a call, with SQLite and with Redis.

Run with ``python -m bench.budget`` (``make bench`` runs it after the pii scenario).
Everything is measured in one run, on loopback, in front of one ``veil mock-upstream``:

- ``core``: ``veil serve`` with an empty pipeline (the core only), the baseline;
- ``sqlite``: ``veil serve`` with ``pipeline = ["budget"]`` and ``store = "sqlite"``
  (the file in the gateway's state dir);
- ``redis``: the same with ``store = "redis"``, on a ``redis-server`` this scenario
  starts (skipped, saying why, when ``redis-server`` is not installed).

Both budget gateways apply, to every call, a team budget (month), a key budget (day)
and a gateway budget (no period), each of $1,000,000, and a key rate limit of 10^8
requests and 10^12 tokens a minute: every rule is checked, reserved and settled on
every call, and none ever refuses one. Before measuring, one call to each budget
gateway must come back with ``x-veil-budget-remaining-usd`` and
``x-ratelimit-limit-requests``, or the run stops (exit 1).

Load: wrk with bench/wrk_post.lua (the Python generator bench/loadgen.py when wrk is
missing) sending the main bench's chat completion (bench/payloads.py), non-streaming
and streaming, at 1 and 16 connections (``--connections``). Each gateway gets a warm-up
per mode, then the plan is interleaved: for each round, mode and connection count,
core, sqlite and redis are loaded one right after the other. Any error (a non-2xx
answer or a socket error) stops the run (exit 1).

Measured: each gateway's CPU ms per request, i.e. user+system CPU time of its process
tree (from /proc, before and after the load) divided by the requests served. That is
the cost of the gateway process only: the mock upstream's and redis-server's CPU per
request are reported beside it but not counted.

Judged: in each (mode, connections) cell, the median CPU ms/req over the rounds of each
gateway gives the ratios sqlite/core and redis/core. A target is the median of its
ratio over all the measured cells (with the default 4 cells: the mean of the two middle
ones), and PASSes when at most 1.15 ("the budget stage adds at most 15% CPU per
request over the core-only gateway measured in the same run").

Exit codes: 0 ran (even if a target failed), 1 setup failed, a server or the load
generator failed, or a load saw errors, 2 usage, 3 with ``--strict`` a target failed,
130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Any

from bench import stage_cpu
from bench.stage_cpu import BenchError, Setup, StageScenario, check_answers, probe, upstream_line

REDIS_ENV = "VEIL_BUDGET_REDIS_URL"
REDIS_CPU = "redis_server_cpu_ms_per_req"
HUGE_USD = 1_000_000


def budget_section(store: str) -> str:
    """``[budget]`` with rules that apply to every call and never refuse one."""
    from veil.testing import _toml_value

    section: dict[str, Any] = {"store": store}
    tables: dict[str, list[dict[str, Any]]] = {
        "budgets": [
            {"scope": "team", "period": "month", "limit_usd": HUGE_USD},
            {"scope": "key", "period": "day", "limit_usd": HUGE_USD},
            {"scope": "gateway", "period": "none", "limit_usd": HUGE_USD},
        ],
        "rate_limits": [{"scope": "key", "rpm": 100_000_000, "tpm": 1_000_000_000_000}],
    }
    lines = ["", "[budget]"] + [f"{k} = {_toml_value(v)}" for k, v in section.items()]
    for name, rules in tables.items():
        for rule in rules:
            lines += ["", f"[[budget.{name}]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"


def remaining_usd(name: str, url: str) -> float:
    """Check that a budget gateway meters a call (a non-streaming one must come back with
    the budget headers, a streaming one with 200); the ``x-veil-budget-remaining-usd``
    of the non-streaming one."""
    status, headers, text = probe(url)
    if status != 200:
        raise BenchError(f"gateway {name} answered {status}: {text}")
    missing = [
        h for h in ("x-veil-budget-remaining-usd", "x-ratelimit-limit-requests") if h not in headers
    ]
    if missing:
        raise BenchError(
            f"gateway {name} served a call without {', '.join(missing)}: the budget stage "
            f"is not metering (headers: {sorted(headers)})"
        )
    status, _, text = probe(url, stream=True)
    if status != 200:
        raise BenchError(f"gateway {name} answered {status} to a streaming call: {text}")
    return float(headers["x-veil-budget-remaining-usd"])


class BudgetScenario(StageScenario):
    """The budget stage with each store; redis-server is started here, and its CPU per
    request is reported beside the redis gateway's."""

    stage = "budget"
    gateways = ("sqlite", "redis")
    limit = 1.15
    example = "--stores sqlite --connections 16 --repeat 5"
    quick_time = "about 1 minute"
    select_option = "--stores"
    select_help = "budget stores to measure against the core: sqlite, redis or both (default both)"
    side_key = REDIS_CPU
    ratio_width = 13
    rps_width = 12

    def __init__(self) -> None:
        self.before: dict[str, float] = {}
        """Each gateway's ``x-veil-budget-remaining-usd`` before the load."""

    def start_services(
        self, setup: Setup, gateways: list[str], result: dict[str, Any]
    ) -> list[str]:
        """Start redis-server for the redis store; skip the store when it is not installed."""
        from veil.testing import RedisServer

        if "redis" not in gateways:
            return gateways
        try:
            redis = RedisServer()
        except FileNotFoundError as err:
            self.note(f"SKIP redis: {err}")
            result["skipped"]["redis"] = str(err)
            return [g for g in gateways if g != "redis"]
        setup.services["redis"] = redis
        redis.wait_ready()
        self.note(f"started redis-server on 127.0.0.1:{redis.port}")
        return gateways

    def policy_tail(self, gateway: str) -> str:
        return budget_section(gateway)

    def gateway_env(self, setup: Setup, gateway: str) -> dict[str, str] | None:
        return {REDIS_ENV: setup.services["redis"].url} if gateway == "redis" else None

    def preflight(self, setup: Setup, gateways: list[str]) -> None:
        """Every budget gateway meters a call (headers), and core answers."""
        self.before = {g: remaining_usd(g, setup.base_url(g)) for g in gateways}
        check_answers(setup, [stage_cpu.CORE])
        self.note("every budget gateway meters calls (x-veil-budget-remaining-usd, x-ratelimit-*)")

    def side_pid(self, setup: Setup, gateway: str) -> int | None:
        redis = setup.services.get("redis")
        if redis is None or gateway != "redis":
            return None
        pid: int = redis.proc.pid
        return pid

    def after_load(self, setup: Setup, result: dict[str, Any]) -> None:
        """``metering``: what each budget gateway metered during the load."""
        after = {g: remaining_usd(g, setup.base_url(g)) for g in self.before}
        result["metering"] = {}
        for g, before in self.before.items():
            spent = before - after[g]
            # the two probes that read `before`, then the load (the reservation of the
            # probe reading `after` cancels the one in `before`)
            calls = result["requests_served"][g] + 2
            result["metering"][g] = {
                "metered_usd": round(spent, 6),
                "requests": calls,
                "usd_per_call": spent / calls,
            }

    def report_lines(self, result: dict[str, Any], targets: list[str]) -> list[str]:
        """redis-server's and the mock's CPU per request, and what was metered."""
        lines = []
        redis = [
            f"{cell['mode']} c={cell['conns']}: {r:.3f}"
            for cell in result["cells"]
            if (r := cell.get("redis", {}).get(REDIS_CPU)) is not None
        ]
        if redis:
            lines.append("redis-server CPU ms/req (not counted above): " + "; ".join(redis))
        mock = upstream_line(result, targets)
        if mock:
            lines.append(mock)
        for g, m in result.get("metering", {}).items():
            lines.append(
                f"{g} metered ${m['metered_usd']:.6f} for ~{m['requests']} calls "
                f"(~${m['usd_per_call']:.8f} a call)"
            )
        return lines


def main(argv: list[str] | None = None) -> int:
    return stage_cpu.main(BudgetScenario(), argv)


if __name__ == "__main__":
    sys.exit(main())
