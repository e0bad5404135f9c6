"""Routing scenario: the CPU the ``routing`` stage adds to a call, and the decision
latency of learned strategies.

Run with ``python -m bench.routing`` (``make bench`` runs it after the audit scenario).

1. Static routing CPU, measured in one run on loopback in front of one
   ``veil mock-upstream`` (the shared stage-CPU harness, bench/stage_cpu.py):

   - ``core``: ``veil serve`` with an empty pipeline (the core only), the baseline;
   - ``routing``: ``veil serve`` with ``pipeline = ["routing"]`` and a static
     section that makes the stage do its whole per-call work: five rules tested on
     every call (team, key tag, metadata, keywords and a regex on the last user
     message) that do not match, the requested model routed to its deployment with
     the capability filter and the context-window check (the prompt's tokens
     estimated), a circuit breaker and a latency average fed by the core's
     per-attempt report, the ``x-veil-route`` header and the audit decision.

   Before measuring, a non-streaming and a streaming call to each gateway must
   succeed and the routing gateway must answer with ``x-veil-route``. Load: wrk (or
   bench/loadgen.py) with the main bench's chat completion, non-streaming and
   streaming, at 1 and 16 connections, interleaved. Judged: the median over the cells
   of the ratio routing/core of CPU ms per request; PASS when at most 1.05.

2. Decision latency of a learned strategy (in-process, after the load): a router
   (``--router ARTIFACT``, or one trained on the first rows of ``--data`` files,
   by default ``../shared/data/routing/routellm_pairs.dev.jsonl`` when it exists)
   behind the stage's pool routing; ``--decisions`` calls of ``on_request`` (router
   prediction, strategy, chain, reason) on prompts from the data that were not
   trained on. Reported: p50 and p99 in ms; PASS when p99 < 2 ms. Skipped, saying
   why, when ``veil_routing.learned`` is not installed or there is no data.

Exit codes: 0 ran (even if a target failed), 1 setup failed, a server or the load
generator failed, or a load saw errors, 2 usage, 3 with ``--strict`` a target
failed, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stage_cpu
from bench.payloads import MODEL
from bench.stage_cpu import CORE, BenchError, Setup, StageScenario

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "routing" / "routellm_pairs.dev.jsonl"
DECISION_LIMIT_MS = 2.0

STATIC_SECTION = f"""
[routing]
balance = "round_robin"

[[routing.rules]]
id = "support-team"
teams = ["other"]
route = "{MODEL}"

[[routing.rules]]
id = "batch-keys"
key_tags = ["batch"]
route = "{MODEL}"

[[routing.rules]]
id = "gold-tier"
metadata = {{ tier = "gold" }}
route = "{MODEL}"

[[routing.rules]]
id = "incidents"
keywords = ["stacktrace", "segfault", "compile error"]
route = "{MODEL}"

[[routing.rules]]
id = "code-questions"
pattern = "\\\\bdef \\\\w+\\\\("
route = "{MODEL}"

[routing.models."{MODEL}"]
tools = true
json_mode = true
context_window = 128000
"""


def _rows(paths: list[Path], limit: int) -> list[dict[str, Any]]:
    import orjson

    rows: list[dict[str, Any]] = []
    for path in paths:
        with path.open("rb") as f:
            for line in f:
                if line.strip():
                    rows.append(orjson.loads(line))
                if len(rows) >= limit:
                    return rows
    return rows


def decision_latency(
    router_path: Path | None, data: list[Path], count: int, train_rows: int
) -> dict[str, Any]:
    """p50/p99 of the stage's pool routing with a learned router, in ms; a dict
    with ``skipped`` when it cannot run."""
    try:
        learned: Any = importlib.import_module("veil_routing.learned")
    except ImportError as e:
        return {"skipped": f"veil_routing.learned is not installed ({e})"}
    from prometheus_client import CollectorRegistry
    from veil_routing.metrics import RoutingMetrics
    from veil_routing.settings import RoutingSettings
    from veil_routing.stage import RoutingStage

    from veil.policy.model import parse_policy
    from veil.testing import policy_toml
    from veil.types import Call, Principal

    data = [p for p in data if p.exists()]
    if not data:
        return {"skipped": "no routing data (pass --data FILE.jsonl)"}
    rows = _rows(data, train_rows + count)
    if len(rows) <= train_rows:
        return {"skipped": f"the data has {len(rows)} rows; need more than {train_rows}"}
    if router_path is not None:
        sha = learned.file_sha256(router_path)
        router = learned.load(router_path, sha)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            router = learned.train(rows[:train_rows])
            router.save(Path(tmp) / "bench.veilrouter")
    prompts = [str(r["prompt"]) for r in rows[train_rows:]][:count]
    models = list(router.models)
    deployments = [
        {"name": f"m{i}", "provider": "mock", "model": f"m{i}", "input_per_mtok": 1.0 + i}
        for i in range(len(models))
    ]
    text = policy_toml(pipeline=["routing"], deployments=deployments)
    policy = parse_policy(text.encode())
    settings = RoutingSettings.model_validate(
        {
            "router": {
                "artifact": "unused",
                "sha256": "0" * 64,
                "models": {f"m{i}": m for i, m in enumerate(models)},
            },
            "pools": {"auto": {"models": [f"m{i}" for i in range(len(models))]}},
        }
    )
    stage = RoutingStage(settings)
    stage.start(policy, RoutingMetrics(CollectorRegistry()), router)
    principal = Principal("bench", "test")

    async def run() -> list[float]:
        times = []
        for prompt in itertools.islice(itertools.cycle(prompts), count):
            call = Call(
                id="bench",
                kind="chat",
                request={"model": "auto", "messages": [{"role": "user", "content": prompt}]},
                principal=principal,
                policy=policy,
                headers={},
            )
            t0 = time.perf_counter()
            await stage.on_request(call)
            times.append((time.perf_counter() - t0) * 1000)
        return times

    asyncio.run(run())  # warm-up
    times = sorted(asyncio.run(run()))
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return {
        "decisions": len(times),
        "models": len(models),
        "p50_ms": round(statistics.median(times), 4),
        "p99_ms": round(p99, 4),
        "limit_ms": DECISION_LIMIT_MS,
        "pass": p99 < DECISION_LIMIT_MS,
    }


class RoutingScenario(StageScenario):
    """Static routing with rules, capability and context checks, breakers; then
    the learned strategy's decision latency."""

    stage = "routing"
    gateways = ("routing",)
    limit = 1.05
    options: Any = None

    def policy_tail(self, gateway: str) -> str:
        return STATIC_SECTION

    def preflight(self, setup: Setup, gateways: list[str]) -> None:
        """Both gateways answer; the routing gateway says how it routed."""
        super().preflight(setup, gateways)
        for stream in (False, True):
            status, headers, body = stage_cpu.probe(setup.base_url("routing"), stream)
            route = headers.get("x-veil-route", "")
            if status != 200 or not route.startswith(f"model={MODEL}"):
                raise BenchError(f"the routing gateway did not route ({status}: {route!r})")
        self.note(f"the routing gateway routes: x-veil-route: {route}")
        assert CORE in setup.gateways

    def after_load(self, setup: Setup, result: dict[str, Any]) -> None:
        """``decision_latency``: the learned strategy's p50/p99 (or why skipped)."""
        opts = self.options
        self.note("measuring the decision latency of a learned strategy")
        result["decision_latency"] = decision_latency(
            opts.router if opts else None,
            opts.data if opts and opts.data else [DEFAULT_DATA],
            opts.decisions if opts else 2000,
            opts.train_rows if opts else 2000,
        )
        d = result["decision_latency"]
        if "p99_ms" in d:
            result["targets"]["learned decision p99 < 2 ms"] = d["pass"]

    def report_lines(self, result: dict[str, Any], targets: list[str]) -> list[str]:
        d = result.get("decision_latency") or {}
        if "skipped" in d:
            return [f"learned decision latency: skipped ({d['skipped']})"]
        if not d:
            return []
        verdict = "PASS" if d["pass"] else "FAIL"
        return [
            f"learned decision latency ({d['decisions']} decisions, {d['models']} models): "
            f"p50 {d['p50_ms']:.3f} ms, p99 {d['p99_ms']:.3f} ms (limit 2 ms) {verdict}"
        ]


def main(argv: list[str] | None = None) -> int:
    import argparse

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--router", type=Path, default=None, help="a trained router artifact")
    own.add_argument("--data", type=Path, action="append", help="routing JSONL (repeatable)")
    own.add_argument("--decisions", type=int, default=2000, help="decisions to time")
    own.add_argument("--train-rows", type=int, default=2000, help="rows to train on")
    opts, rest = own.parse_known_args(argv if argv is not None else sys.argv[1:])
    sc = RoutingScenario()
    sc.options = opts
    return stage_cpu.main(sc, rest)


if __name__ == "__main__":
    sys.exit(main())
