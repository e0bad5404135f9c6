"""Audit scenario: the CPU the ``audit`` stage adds to a call.

Run with ``python -m bench.audit`` (``make bench`` runs it after the budget scenario).
Everything is measured in one run, on loopback, in front of one ``veil mock-upstream``:

- ``core``: ``veil serve`` with an empty pipeline (the core only), the baseline;
- ``audit``: ``veil serve`` with ``pipeline = ["audit"]`` and its defaults: one sealed
  record per call (HMAC-SHA256 hash chain) appended by the writer thread to a JSONL
  file in the gateway's state dir before the call is answered (group commit, no
  fsync), plus the audit metrics.

Before measuring, one call to the audit gateway must leave exactly one new record in
its file, or the run stops (exit 1). After the load, there must be a record for every
call served (and for the calls in flight when a load ended), and the file must verify
(``veil audit verify`` logic), or the run stops.

Load: wrk with bench/wrk_post.lua (the Python generator bench/loadgen.py when wrk is
missing) sending the main bench's chat completion (bench/payloads.py), non-streaming
and streaming, at 1 and 16 connections (``--connections``). Each gateway gets a warm-up
per mode, then the plan is interleaved: for each round, mode and connection count,
core and audit are loaded one right after the other. Any error (a non-2xx answer or a
socket error) stops the run (exit 1).

Measured: each gateway's CPU ms per request, i.e. user+system CPU time of its process
tree (from /proc, before and after the load; the writer thread included) divided by the
requests served. The mock upstream's CPU per request is reported but not counted.

Judged: in each (mode, connections) cell, the median CPU ms/req over the rounds of each
gateway gives the ratio audit/core. The target is the median of that ratio over all
the measured cells (with the default 4 cells: the mean of the two middle ones), and
PASSes when at most 1.10 ("the audit stage adds at most 10% CPU per request over the
core-only gateway measured in the same run").

Exit codes: 0 ran (even if the target failed), 1 setup failed, a server or the load
generator failed, or a load saw errors, 2 usage, 3 with ``--strict`` the target
failed, 130 interrupted.
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
from bench.harness import CHAT_PATH, MODES, Progress, Running, Sample, Step, aggregate, measure
from bench.load import LoadError, LoadGenerator, find_wrk
from bench.payloads import API_KEY, MODEL, api_key_sha256, chat_body, chat_body_bytes
from bench.procs import Server, ServerStartError, Supervisor, free_port, tail
from bench.veil_target import default_veil_bin, mock_command, supports

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "audit-latest.json"
AUDIENCE = "bench"
LIMIT = 1.10
TARGET_NAME = "audit adds <= 10% CPU per request"
KEY_ENV = "VEIL_AUDIT_HMAC_KEY"
BENCH_KEY = "bench-audit-hmac-key-not-a-secret"
EXIT_OK, EXIT_SETUP, EXIT_USAGE, EXIT_TARGETS = 0, 1, 2, 3


class BenchError(RuntimeError):
    """Setup failed, a server misbehaved, or a load saw errors."""


def note(message: str) -> None:
    print(f"bench.audit: {message}", file=sys.stderr, flush=True)


def policy(mock_url: str, audit: bool) -> str:
    """The signed-policy text for one gateway: core only or with audit (defaults)."""
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
        pipeline=["audit"] if audit else [],
        plugins={"audit": {}} if audit else None,
        deployments=[deployment],
    )
    return text + f'\n[[keys]]\nid = "bench"\nteam = "test"\nsha256 = "{api_key_sha256()}"\n'


@dataclass
class Setup:
    """Everything started for a run; ``close`` stops it all."""

    workdir: Path
    sup: Supervisor
    mock: Server | None = None
    gateways: dict[str, Any] = field(default_factory=dict)
    running: dict[str, Running] = field(default_factory=dict)

    @property
    def audit_dir(self) -> Path:
        return self.workdir / "state-audit" / "audit"

    def save_logs(self) -> None:
        for name, gw in self.gateways.items():
            (self.workdir / f"{name}.log").write_text(gw.output())

    def close(self) -> None:
        for gw in self.gateways.values():
            gw.stop()
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


def start_gateways(setup: Setup, targets: list[str]) -> None:
    from veil.testing import GatewayProcess, PolicyKit

    assert setup.mock is not None
    kit = PolicyKit(setup.workdir)
    for name in targets:
        path = kit.write(policy(setup.mock.base_url, name == "audit"), f"{name}.toml")
        note(f"starting gateway {name}")
        setup.gateways[name] = GatewayProcess(
            path,
            kit.public_key_path,
            audience=AUDIENCE,
            state_dir=setup.workdir / f"state-{name}",
            env={KEY_ENV: BENCH_KEY},
        )
    for name, gw in setup.gateways.items():
        try:
            gw.wait_ready(120)
        except RuntimeError as err:
            raise BenchError(f"gateway {name} did not start: {err}") from None
        server = Server(name, gw.proc, gw.port, setup.workdir / f"{name}.log")
        setup.running[name] = Running(name, server, upstream=setup.mock)


def probe(url: str, stream: bool = False) -> tuple[int, str]:
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(url + CHAT_PATH, json=chat_body(stream), headers=headers, timeout=30)
    return r.status_code, r.text[:300]


def call_records(directory: Path) -> list[dict[str, Any]]:
    import orjson

    out = []
    for path in sorted(directory.glob("audit*.jsonl")):
        for line in path.read_bytes().splitlines():
            record = orjson.loads(line)
            if record.get("event") == "call":
                out.append(record)
    return out


def check_records(setup: Setup, expected: int) -> dict[str, Any]:
    """The audit gateway wrote one record per call and the chain verifies."""
    from veil_audit.verify import verify

    records = call_records(setup.audit_dir)
    # the load generator leaves calls in flight when it stops: those are recorded
    # too (200 when the gateway finished them, 499 when the client went first)
    odd = sum(1 for r in records if r["status"] not in (200, 499))
    if len(records) < expected or odd:
        raise BenchError(
            f"the audit gateway served {expected} calls but wrote {len(records)} records "
            f"({odd} with a status other than 200 or 499)"
        )
    verdict = verify(sorted(setup.audit_dir.glob("audit*.jsonl")), BENCH_KEY.encode())
    if not verdict.ok:
        raise BenchError(f"the audit files do not verify: {verdict.problem}")
    sizes = [len(json.dumps(r, separators=(",", ":"))) for r in records[-1000:]]
    return {"records": len(records), "median_record_bytes": int(statistics.median(sizes))}


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


def run_plan(
    setup: Setup, gen: LoadGenerator, steps: list[Step], result: dict[str, Any]
) -> dict[tuple[str, str, int], list[Sample]]:
    body_files = {}
    for mode in MODES:
        path = setup.workdir / f"body-{mode}.json"
        path.write_bytes(chat_body_bytes(stream=mode == "stream"))
        body_files[mode] = path
    served = result.setdefault("requests_served", {})
    samples: dict[tuple[str, str, int], list[Sample]] = {}
    progress = Progress(steps)
    for i, step in enumerate(steps):
        progress.before(i)
        sample = measure(gen, setup.sup, setup.running[step.target], step, body_files)
        progress.after(i)
        n = sample.load.requests
        what = " ".join(step.label().split())
        served[step.target] = served.get(step.target, 0) + n
        load = sample.load
        if load.errors or n == 0:
            raise BenchError(
                f"{what}: {load.errors} errors in {n} requests (non-2xx {load.non2xx}, "
                f"connect {load.connect_errors}, read {load.read_errors}, timeout {load.timeouts})"
            )
        if setup.gateways[step.target].proc.poll() is not None:
            raise BenchError(f"gateway {step.target} exited during {what}")
        if step.kind == "measure":
            samples.setdefault((step.target, step.mode, step.conns), []).append(sample)
    return samples


def summarize(
    samples: dict[tuple[str, str, int], list[Sample]], modes: list[str], conns: list[int]
) -> tuple[list[dict[str, Any]], float | None]:
    cells: list[dict[str, Any]] = []
    ratios: list[float] = []
    for mode in modes:
        for c in conns:
            cell: dict[str, Any] = {"mode": mode, "conns": c}
            for t in ("core", "audit"):
                cell[t] = aggregate(samples.get((t, mode, c), []))
            a, b = cell["audit"]["cpu_ms_per_req"], cell["core"]["cpu_ms_per_req"]
            ratio = a / b if a is not None and b else None
            cell["ratio"] = None if ratio is None else round(ratio, 3)
            if ratio is not None:
                ratios.append(ratio)
            cells.append(cell)
    return cells, (round(statistics.median(ratios), 3) if ratios else None)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    rounds = result["meta"]["rounds"]
    lines = [
        f"audit stage: gateway CPU ms per request (process tree; median of {rounds} "
        f"round{'s' if rounds != 1 else ''}), load generator {result['meta']['loadgen']}",
        "",
        f"{'mode':<10}{'conns':>6}{'core':>9}{'audit':>9}{'audit/core':>12}"
        f"{'core rps':>10}{'audit rps':>11}",
    ]
    for cell in result["cells"]:
        lines.append(
            f"{cell['mode']:<10}{cell['conns']:>6}{_fmt(cell['core']['cpu_ms_per_req']):>9}"
            f"{_fmt(cell['audit']['cpu_ms_per_req']):>9}{_fmt(cell['ratio']) + 'x':>12}"
            f"{_fmt(cell['core']['rps'], '.0f'):>10}{_fmt(cell['audit']['rps'], '.0f'):>11}"
        )
    lines.append(f"{'median ratio over cells':<34}{_fmt(result['median_ratio']) + 'x':>12}")
    rec = result.get("records") or {}
    if rec:
        lines.append(
            f"records written: {rec['records']} (one per call served or in flight when a load "
            f"ended; chain verified); median record {rec['median_record_bytes']} bytes"
        )
    ok = result["targets"].get(TARGET_NAME)
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    lines += ["", f"  {status}  {TARGET_NAME} (median {_fmt(result['median_ratio'])}x, "
              f"limit {LIMIT}x)"]  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m bench.audit",
        description=doc.split("\nExit codes")[0],
        epilog="exit codes: 0 ran (even if the target failed), 1 setup/server/load failed or a "
        "load saw errors,\n            2 usage, 3 --strict and the target failed, 130 "
        "interrupted\n\nexamples:\n  python -m bench.audit\n"
        "  python -m bench.audit --quick --json\n"
        "  python -m bench.audit --connections 16 --repeat 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 s measurements, 1 round, 1 s warm-ups"
    )
    parser.add_argument(
        "--duration", type=_positive, default=None, metavar="S",
        help="seconds per measurement (default 8; 3 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=_positive, default=None, metavar="N",
        help="rounds of the interleaved plan; medians are taken (default 3; 1 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=_non_negative, default=None, metavar="S",
        help="warm-up seconds per gateway and mode (default 2; 1 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--connections", type=_conns, default=[1, 16], metavar="N,N",
        help="concurrent connections per measurement (default 1,16)",
    )  # fmt: skip
    parser.add_argument(
        "--loadgen", choices=("auto", "wrk", "python"), default="auto",
        help="load generator (default auto: wrk when on PATH, else bench/loadgen.py)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 3 when the target fails")
    parser.add_argument(
        "--keep-tmp", action="store_true",
        help="keep the temp dir (policies, keys, logs, audit files); kept anyway on failure",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)})",
    )  # fmt: skip
    return parser


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        "scenario": "audit",
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
        "cells": [],
        "median_ratio": None,
        "targets": {},
        "error": None,
    }
    workdir = Path(tempfile.mkdtemp(prefix="veil-bench-audit-"))
    setup = Setup(workdir=workdir, sup=Supervisor(log_dir=workdir))
    code, keep = EXIT_OK, args.keep_tmp
    try:
        setup.mock = start_mock(setup)
        targets = ["core", "audit"]
        start_gateways(setup, targets)
        for name in targets:
            for stream in (False, True):
                status, text = probe(setup.running[name].server.base_url, stream)
                if status != 200:
                    raise BenchError(f"gateway {name} answered {status} (stream={stream}): {text}")
        check_records(setup, 2)
        note("the audit gateway writes one verified record per call")
        steps = make_plan(targets, modes, conns, duration, warmup, rounds)
        samples = run_plan(setup, gen, steps, result)
        result["records"] = check_records(setup, result["requests_served"]["audit"] + 2)
        cells, median = summarize(samples, modes, conns)
        result["cells"], result["median_ratio"] = cells, median
        result["targets"][TARGET_NAME] = None if median is None else median <= LIMIT
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
            note(f"kept temp dir (policies, keys, logs, audit files): {workdir}")
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
