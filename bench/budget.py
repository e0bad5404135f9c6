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

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from bench.cli import _conns, _non_negative, _positive
from bench.cpu import tree_cpu_seconds
from bench.harness import CHAT_PATH, MODES, Progress, Running, Sample, Step, aggregate, measure
from bench.load import LoadError, LoadGenerator, find_wrk
from bench.payloads import API_KEY, MODEL, api_key_sha256, chat_body, chat_body_bytes
from bench.procs import Server, ServerStartError, Supervisor, free_port, tail
from bench.veil_target import default_veil_bin, mock_command, supports

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "budget-latest.json"
AUDIENCE = "bench"
LIMIT = 1.15
STORES = ("sqlite", "redis")
REDIS_ENV = "VEIL_BUDGET_REDIS_URL"
HUGE_USD = 1_000_000
TARGET_NAMES = {s: f"{s}: budget adds <= 15% CPU per request" for s in STORES}
EXIT_OK, EXIT_SETUP, EXIT_USAGE, EXIT_TARGETS = 0, 1, 2, 3


class BenchError(RuntimeError):
    """Setup failed, a server misbehaved, or a load saw errors."""


def note(message: str) -> None:
    print(f"bench.budget: {message}", file=sys.stderr, flush=True)


# -- policies -------------------------------------------------------------------------


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


def policy(mock_url: str, store: str | None) -> str:
    """The signed-policy text for one gateway: core only (``store`` None) or budget."""
    from veil.testing import policy_toml

    deployment = {
        "name": MODEL,
        "provider": "openai",
        "model": MODEL,
        "api_base": mock_url.rstrip("/") + "/v1",
        "input_per_mtok": 0.15,
        "output_per_mtok": 0.6,
    }
    text = policy_toml(
        audience=AUDIENCE,
        pipeline=["budget"] if store else [],
        plugins={"budget": {}} if store else None,
        deployments=[deployment],
    )
    text += f'\n[[keys]]\nid = "bench"\nteam = "test"\nsha256 = "{api_key_sha256()}"\n'
    return text + (budget_section(store) if store else "")


# -- processes ------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything started for a run; ``close`` stops it all."""

    workdir: Path
    sup: Supervisor
    mock: Server | None = None
    redis: Any = None
    gateways: dict[str, Any] = field(default_factory=dict)
    running: dict[str, Running] = field(default_factory=dict)

    def save_logs(self) -> None:
        """Copy the gateways' logs (GatewayProcess deletes them on stop) to the workdir."""
        for name, gw in self.gateways.items():
            (self.workdir / f"{name}.log").write_text(gw.output())

    def close(self) -> None:
        for gw in self.gateways.values():
            gw.stop()
        if self.redis is not None:
            self.redis.stop()
        self.sup.stop_all()


def start_mock(setup: Setup) -> Server:
    veil = default_veil_bin()
    ok, why = supports(veil, "mock-upstream")
    if not ok:
        raise BenchError(f"veil mock-upstream is not usable: {why}")
    port = free_port()
    note(f"starting the mock upstream on 127.0.0.1:{port}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    server = setup.sup.start("mock", mock_command(veil, port), port, env=env, cwd=ROOT)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    setup.sup.wait_ready(
        server, server.base_url + CHAT_PATH, chat_body_bytes(False), headers, timeout=60
    )
    return server


def start_redis(setup: Setup) -> str | None:
    """Start redis-server into ``setup.redis``; None, or why it cannot run (not installed)."""
    from veil.testing import RedisServer

    try:
        redis = RedisServer()
    except FileNotFoundError as err:
        return str(err)
    setup.redis = redis
    redis.wait_ready()
    note(f"started redis-server on 127.0.0.1:{redis.port}")
    return None


def start_gateways(setup: Setup, targets: list[str]) -> None:
    """Write and sign the three policies, start the gateways, wait until they are ready."""
    from veil.testing import GatewayProcess, PolicyKit

    assert setup.mock is not None
    kit = PolicyKit(setup.workdir)
    for name in targets:
        path = kit.write(
            policy(setup.mock.base_url, None if name == "core" else name), f"{name}.toml"
        )
        env = {REDIS_ENV: setup.redis.url} if name == "redis" else None
        note(f"starting gateway {name}")
        setup.gateways[name] = GatewayProcess(
            path,
            kit.public_key_path,
            audience=AUDIENCE,
            state_dir=setup.workdir / f"state-{name}",
            env=env,
        )
    for name, gw in setup.gateways.items():
        try:
            gw.wait_ready(120)
        except RuntimeError as err:
            raise BenchError(f"gateway {name} did not start: {err}") from None
        server = Server(name, gw.proc, gw.port, setup.workdir / f"{name}.log")
        setup.running[name] = Running(name, server, upstream=setup.mock)


def probe(url: str, stream: bool = False) -> tuple[int, dict[str, str], str]:
    """One chat call: (status, headers, start of the body)."""
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(url + CHAT_PATH, json=chat_body(stream), headers=headers, timeout=30)
    return r.status_code, dict(r.headers), r.text[:300]


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


# -- the plan -------------------------------------------------------------------------


def make_plan(
    targets: list[str], modes: list[str], conns: list[int], duration: int, warmup: int, rounds: int
) -> list[Step]:
    steps: list[Step] = []
    for rnd in range(rounds):
        for mode in modes:
            if rnd == 0 and warmup > 0:
                steps += [Step("warmup", t, mode, min(16, max(conns)), warmup) for t in targets]
            for c in conns:
                steps += [Step("measure", t, mode, c, duration, rnd) for t in targets]
    return steps


def _errors(sample: Sample) -> str:
    load = sample.load
    return (
        f"{load.errors} errors in {load.requests} requests (non-2xx {load.non2xx}, "
        f"connect {load.connect_errors}, read {load.read_errors}, write {load.write_errors}, "
        f"timeout {load.timeouts})"
    )


def run_plan(
    setup: Setup, gen: LoadGenerator, steps: list[Step], result: dict[str, Any]
) -> dict[tuple[str, str, int], list[tuple[Sample, float | None]]]:
    body_files = {}
    for mode in MODES:
        path = setup.workdir / f"body-{mode}.json"
        path.write_bytes(chat_body_bytes(stream=mode == "stream"))
        body_files[mode] = path
    redis_pid: int | None = setup.redis.proc.pid if setup.redis is not None else None
    served = result.setdefault("requests_served", {})
    samples: dict[tuple[str, str, int], list[tuple[Sample, float | None]]] = {}
    progress = Progress(steps)
    for i, step in enumerate(steps):
        progress.before(i)
        target = setup.running[step.target]
        watch_redis = redis_pid if step.target == "redis" else None
        r0 = tree_cpu_seconds(watch_redis) if watch_redis else 0.0
        sample = measure(gen, setup.sup, target, step, body_files)
        r1 = tree_cpu_seconds(watch_redis) if watch_redis else 0.0
        progress.after(i)
        n = sample.load.requests
        what = " ".join(step.label().split())
        served[step.target] = served.get(step.target, 0) + n
        if sample.load.errors or n == 0:
            raise BenchError(f"{what}: {_errors(sample)}")
        if step.target in setup.gateways and setup.gateways[step.target].proc.poll() is not None:
            raise BenchError(f"gateway {step.target} exited during {what}")
        if step.kind == "measure":
            redis_ms = (r1 - r0) * 1000 / n if watch_redis else None
            samples.setdefault((step.target, step.mode, step.conns), []).append((sample, redis_ms))
    return samples


# -- results --------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def summarize(
    samples: dict[tuple[str, str, int], list[tuple[Sample, float | None]]],
    targets: list[str],
    modes: list[str],
    conns: list[int],
) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """Per-cell aggregates and ratios, and each store's median ratio over the cells."""
    cells: list[dict[str, Any]] = []
    per_store: dict[str, list[float]] = {s: [] for s in STORES}
    for mode in modes:
        for c in conns:
            cell: dict[str, Any] = {"mode": mode, "conns": c, "ratios": {}}
            for t in targets:
                got = samples.get((t, mode, c), [])
                agg = aggregate([s for s, _ in got])
                redis_ms = [r for _, r in got if r is not None]
                if redis_ms:
                    agg["redis_server_cpu_ms_per_req"] = statistics.median(redis_ms)
                cell[t] = agg
            for s in STORES:
                if s in targets:
                    r = _ratio(cell[s]["cpu_ms_per_req"], cell["core"]["cpu_ms_per_req"])
                    cell["ratios"][f"{s}/core"] = None if r is None else round(r, 3)
                    if r is not None:
                        per_store[s].append(r)
            cells.append(cell)
    medians = {s: (round(statistics.median(v), 3) if v else None) for s, v in per_store.items()}
    return cells, medians


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    targets = result["meta"]["targets"]
    rounds = result["meta"]["rounds"]
    lines = [
        f"budget stage: gateway CPU ms per request (process tree; median of {rounds} "
        f"round{'s' if rounds != 1 else ''}), load generator {result['meta']['loadgen']}",
        "",
        f"{'mode':<10}{'conns':>6}"
        + "".join(f"{t:>9}" for t in targets)
        + "".join(f"{s + '/core':>13}" for s in STORES if s in targets)
        + "".join(f"{t + ' rps':>12}" for t in targets),
    ]
    for cell in result["cells"]:
        lines.append(
            f"{cell['mode']:<10}{cell['conns']:>6}"
            + "".join(f"{_fmt(cell[t]['cpu_ms_per_req']):>9}" for t in targets)
            + "".join(
                f"{_fmt(cell['ratios'][f'{s}/core'], '.3f') + 'x':>13}"
                for s in STORES
                if s in targets
            )
            + "".join(f"{_fmt(cell[t]['rps'], '.0f'):>12}" for t in targets)
        )
    med = result["median_ratio"]
    lines.append(
        f"{'median ratio over cells':<{16 + 9 * len(targets)}}"
        + "".join(f"{_fmt(med[s]) + 'x':>13}" for s in STORES if s in targets)
    )
    extra = []
    for cell in result["cells"]:
        r = cell.get("redis", {}).get("redis_server_cpu_ms_per_req")
        if r is not None:
            extra.append(f"{cell['mode']} c={cell['conns']}: {r:.3f}")
    if extra:
        lines.append("redis-server CPU ms/req (not counted above): " + "; ".join(extra))
    mock = [
        f"{t} {_fmt(statistics.median(v), '.3f')}"
        for t in targets
        if (
            v := [
                c[t]["upstream_cpu_ms_per_req"]
                for c in result["cells"]
                if c[t]["upstream_cpu_ms_per_req"] is not None
            ]
        )
    ]
    if mock:
        lines.append(
            "mock upstream CPU ms/req behind each gateway, median over cells: " + ", ".join(mock)
        )
    for s, m in result.get("metering", {}).items():
        lines.append(
            f"{s} metered ${m['metered_usd']:.6f} for ~{m['requests']} calls "
            f"(~${m['usd_per_call']:.8f} a call)"
        )
    lines.append("")
    for s in STORES:
        ok = result["targets"].get(TARGET_NAMES[s])
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        detail = (
            f"(median {s}/core {med[s]:.3f}x, limit {LIMIT}x)"
            if med.get(s) is not None
            else f"({result['skipped'].get(s, 'not measured')})"
        )
        lines.append(f"  {status}  {TARGET_NAMES[s]} {detail}")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m bench.budget",
        description=doc.split("\nExit codes")[0],
        epilog="exit codes: 0 ran (even if a target failed), 1 setup/server/load failed or a "
        "load saw errors,\n            2 usage, 3 --strict and a target failed, 130 "
        "interrupted\n\nexamples:\n  python -m bench.budget\n"
        "  python -m bench.budget --quick --json\n"
        "  python -m bench.budget --stores sqlite --connections 16 --repeat 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 s measurements, 1 round, 1 s warm-ups (about 1 minute)",
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        default=None,
        metavar="S",
        help="seconds per measurement (default 8; 3 with --quick)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive,
        default=None,
        metavar="N",
        help="rounds of the interleaved plan; medians are taken (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=_non_negative,
        default=None,
        metavar="S",
        help="warm-up seconds per gateway and mode (default 2; 1 with --quick)",
    )
    parser.add_argument(
        "--connections",
        type=_conns,
        default=[1, 16],
        metavar="N,N",
        help="concurrent connections per measurement (default 1,16)",
    )
    parser.add_argument(
        "--stores",
        default="sqlite,redis",
        metavar="S,S",
        help="budget stores to measure against the core: sqlite, redis or both (default both)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (default auto: wrk when on PATH, else bench/loadgen.py)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target fails")
    parser.add_argument(
        "--keep-tmp",
        action="store_true",
        help="keep the temp dir (policies, keys, logs); kept anyway on failure",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)})",
    )
    return parser


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through finally: every process is stopped


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not stores or any(s not in STORES for s in stores):
        parser.error(f"--stores: choose from sqlite, redis (comma-separated), got {args.stores!r}")
    duration = args.duration or (3 if args.quick else 8)
    rounds = args.repeat or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    modes, conns = list(MODES), args.connections
    signal.signal(signal.SIGTERM, _on_sigterm)

    wrk = None
    if args.loadgen != "python":
        wrk = find_wrk()
        if wrk is None and args.loadgen == "wrk":
            note("--loadgen wrk was requested but wrk is not on PATH (apt-get install wrk)")
            return EXIT_SETUP
        if wrk is None:
            note("wrk not found on PATH: using the Python load generator (bench/loadgen.py)")
    gen = LoadGenerator(wrk=wrk)
    result: dict[str, Any] = {
        "scenario": "budget",
        "meta": {
            "loadgen": gen.name,
            "duration_s": duration,
            "warmup_s": warmup,
            "rounds": rounds,
            "connections": conns,
            "modes": modes,
            "limit": LIMIT,
            "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        },
        "skipped": {s: "not requested (--stores)" for s in STORES if s not in stores},
        "cells": [],
        "median_ratio": {s: None for s in STORES},
        "targets": {},
        "error": None,
    }
    workdir = Path(tempfile.mkdtemp(prefix="veil-bench-budget-"))
    setup = Setup(workdir=workdir, sup=Supervisor(log_dir=workdir))
    code, keep = EXIT_OK, args.keep_tmp
    try:
        setup.mock = start_mock(setup)
        if "redis" in stores:
            why = start_redis(setup)
            if why is not None:
                note(f"SKIP redis: {why}")
                result["skipped"]["redis"] = why
                stores.remove("redis")
        targets = ["core", *stores]
        result["meta"]["targets"] = targets
        start_gateways(setup, targets)
        before = {s: remaining_usd(s, setup.running[s].server.base_url) for s in stores}
        for stream in (False, True):
            status, _, text = probe(setup.running["core"].server.base_url, stream)
            if status != 200:
                raise BenchError(f"gateway core answered {status} (stream={stream}): {text}")
        note("every budget gateway meters calls (x-veil-budget-remaining-usd, x-ratelimit-*)")
        steps = make_plan(targets, modes, conns, duration, warmup, rounds)
        samples = run_plan(setup, gen, steps, result)
        after = {s: remaining_usd(s, setup.running[s].server.base_url) for s in stores}
        result["metering"] = {}
        for s in stores:
            spent = before[s] - after[s]
            # the two probes that read `before`, then the load (the reservation of the
            # probe reading `after` cancels the one in `before`)
            calls = result["requests_served"][s] + 2
            result["metering"][s] = {
                "metered_usd": round(spent, 6),
                "requests": calls,
                "usd_per_call": spent / calls,
            }
        cells, medians = summarize(samples, targets, modes, conns)
        result["cells"], result["median_ratio"] = cells, medians
        for s in STORES:
            m = medians.get(s)
            result["targets"][TARGET_NAMES[s]] = None if m is None else m <= LIMIT
    except (BenchError, ServerStartError, LoadError, RuntimeError) as err:
        keep = True
        setup.save_logs()
        result["error"] = f"{type(err).__name__}: {err}"
        note(f"error: {err}")
        for name in setup.gateways:
            note(f"last lines of gateway {name}'s log:\n{tail(workdir / f'{name}.log', 15)}")
        code = EXIT_SETUP
    except KeyboardInterrupt:
        note("interrupted; every process stopped")
        code = 130
    finally:
        setup.close()
        if keep:
            note(f"kept temp dir (policies, keys, logs): {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if code == 130:
        return code
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    elif code == EXIT_OK:
        print(render(result))
        print(f"JSON written to {args.out}")
    if code == EXIT_OK and args.strict and False in result["targets"].values():
        code = EXIT_TARGETS
    return code


if __name__ == "__main__":
    sys.exit(main())
