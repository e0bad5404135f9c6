"""Stage-CPU scenarios: the CPU a pipeline stage adds to a call, against the core only.

A scenario module (``bench.budget``, ``bench.audit``) declares what is its own in a
``StageScenario`` subclass: the stage, its gateways, its limit, extra services, its
pre-flight and post-load checks and its extra report lines. ``main(scenario)`` does the
rest, the same way for every scenario:

1. start one ``veil mock-upstream`` and, in front of it, ``veil serve`` gateways with
   signed policies: ``core`` (empty pipeline, the baseline) and each of the scenario's
   gateways (``pipeline = [stage]``);
2. run the scenario's pre-flight checks, then the interleaved plan (a warm-up per
   gateway and mode, then for each round, mode and connection count every gateway in
   turn, in an order that alternates from one round to the next; with ``--paired``
   every gateway of a cell at the same time, each with its own load) with wrk or
   bench/loadgen.py; a load with any error stops the run;
3. in each (mode, connections) cell, the median CPU ms/req over the rounds of each
   gateway gives the ratio ``<gateway>/core``; a gateway's target is the median of its
   ratio over the cells, PASS when at most the scenario's limit;
4. print the table (or the JSON with ``--json``), write the JSON file, return the exit
   code (``EXIT_*``).

JSON keys: ``scenario``, ``meta``, ``cells``, ``median_ratio``, ``targets``, ``error``,
``requests_served``, then what the scenario adds. With one gateway besides core (audit)
a cell has ``ratio`` and ``median_ratio`` is a number. With several (budget) a cell has
``ratios`` (``{"<gateway>/core": x}``), ``median_ratio`` is keyed by gateway,
``meta.targets`` lists the gateways that ran and ``skipped`` says why the others did not.
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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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

__all__ = [
    "CORE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SETUP",
    "EXIT_TARGETS",
    "EXIT_USAGE",
    "BenchError",
    "Samples",
    "Setup",
    "StageScenario",
    "build_parser",
    "check_answers",
    "main",
    "make_plan",
    "policy",
    "probe",
    "render",
    "run_plan",
    "start_gateways",
    "start_mock",
    "step_groups",
    "summarize",
    "upstream_line",
]

ROOT = Path(__file__).resolve().parent.parent
AUDIENCE = "bench"
CORE = "core"
"""The baseline gateway: ``veil serve`` with an empty pipeline."""
EXIT_OK, EXIT_SETUP, EXIT_USAGE, EXIT_TARGETS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

Samples = dict[tuple[str, str, int], list[tuple[Sample, float | None]]]
"""Measured samples by (gateway, mode, connections), each with the CPU ms/req of the
scenario's side process during that load (None when it watches none)."""


class BenchError(RuntimeError):
    """Setup failed, a server misbehaved, or a load saw errors."""


@dataclass
class Setup:
    """Everything started for a run; ``close`` stops it all."""

    workdir: Path
    sup: Supervisor
    mock: Server | None = None
    services: dict[str, Any] = field(default_factory=dict)
    """Servers a scenario starts besides the gateways (redis-server), each with ``stop()``."""
    gateways: dict[str, Any] = field(default_factory=dict)
    """``veil.testing.GatewayProcess`` by gateway name."""
    running: dict[str, Running] = field(default_factory=dict)

    def state_dir(self, name: str) -> Path:
        """The ``--state-dir`` of gateway ``name``."""
        return self.workdir / f"state-{name}"

    def base_url(self, name: str) -> str:
        """``http://127.0.0.1:PORT`` of gateway ``name``."""
        return self.running[name].server.base_url

    def save_logs(self) -> None:
        """Copy the gateways' logs (GatewayProcess deletes them on stop) to the workdir."""
        for name, gw in self.gateways.items():
            (self.workdir / f"{name}.log").write_text(gw.output())

    def close(self) -> None:
        """Stop the gateways, then the services, then the mock upstream."""
        for gw in self.gateways.values():
            gw.stop()
        for service in self.services.values():
            service.stop()
        self.sup.stop_all()


class StageScenario:
    """What one scenario declares: set the class attributes, override the hooks it needs.

    The hooks run in this order: ``start_services``, then ``policy_tail`` and
    ``gateway_env`` for each gateway, ``preflight``, ``side_pid`` for each step of the
    plan, ``after_load``, and ``report_lines`` when the table is printed.
    """

    stage: str
    """The plugin under test, the pipeline of every gateway but core; also the
    scenario's name (``python -m bench.<stage>``, ``bench/results/<stage>-latest.json``)."""
    gateways: tuple[str, ...]
    """The gateways with the stage, in plan order, each measured against core."""
    limit: float
    """A gateway's target PASSes when the median of its ratio over the cells is at most this."""
    example = "--connections 16 --repeat 5"
    """The arguments of the last example in ``--help``."""
    quick_time = ""
    """How long ``--quick`` takes, for its help (empty: not said)."""
    keeps = "policies, keys, logs"
    """What the temp dir holds (``--keep-tmp``)."""
    select_option = ""
    """With several gateways: the option that chooses them (``--stores``)."""
    select_help = ""
    side_key = "side_cpu_ms_per_req"
    """The cell aggregate key of the CPU ms/req of the process ``side_pid`` names."""
    ratio_width = 0
    """Minimum width of the table's ratio columns (else the header plus 2)."""
    rps_width = 0
    """Minimum width of the table's rps columns (else the header plus 2)."""

    @property
    def doc(self) -> str:
        """The docstring of the scenario's module: the ``--help`` text."""
        return sys.modules[type(self).__module__].__doc__ or ""

    @property
    def single(self) -> bool:
        """One gateway besides core: one target, and the JSON's single-ratio layout."""
        return len(self.gateways) == 1

    @property
    def default_out(self) -> Path:
        return ROOT / "bench" / "results" / f"{self.stage}-latest.json"

    def limit_of(self, gateway: str) -> float:
        """The limit of ``gateway``'s target (default: ``limit``, for every gateway)."""
        return self.limit

    def target_name(self, gateway: str) -> str:
        """The target's name in the report and in the JSON's ``targets``."""
        pct = round((self.limit_of(gateway) - 1) * 100)
        claim = f"{self.stage} adds <= {pct}% CPU per request"
        return claim if self.single else f"{gateway}: {claim}"

    def note(self, message: str) -> None:
        """A status message on stderr."""
        print(f"bench.{self.stage}: {message}", file=sys.stderr, flush=True)

    # -- hooks ------------------------------------------------------------------------

    def start_services(
        self, setup: Setup, gateways: list[str], result: dict[str, Any]
    ) -> list[str]:
        """Start what the gateways need besides the mock (into ``setup.services``); the
        gateways that can run. One that cannot is dropped, with the reason in
        ``result["skipped"]``. Raise ``BenchError`` when the run cannot go on."""
        return gateways

    def policy_tail(self, gateway: str) -> str:
        """Text appended to the policy of a gateway with the stage (not core)."""
        return ""

    def gateway_env(self, setup: Setup, gateway: str) -> dict[str, str] | None:
        """Extra environment of gateway ``gateway`` (core included)."""
        return None

    def preflight(self, setup: Setup, gateways: list[str]) -> None:
        """Check the gateways before the load (default: each answers a call in each
        mode); raise ``BenchError`` to stop the run."""
        check_answers(setup, [CORE, *gateways])

    def body_file(self, setup: Setup, gateway: str, mode: str, default: Path) -> Path:
        """The request body gateway ``gateway`` is loaded with in ``mode`` (default: the
        main bench's body, the same for every gateway)."""
        return default

    def side_pid(self, setup: Setup, gateway: str) -> int | None:
        """A process besides the gateway (redis-server) whose CPU per request, during the
        loads of ``gateway``, goes into the cell as ``side_key`` (not counted)."""
        return None

    def after_load(self, setup: Setup, result: dict[str, Any]) -> None:
        """Check the gateways after the plan and add the scenario's keys to ``result``;
        raise ``BenchError`` to fail the run."""

    def report_lines(self, result: dict[str, Any], targets: list[str]) -> list[str]:
        """Lines printed between the table and the verdicts."""
        return []


# -- processes ------------------------------------------------------------------------


def policy(mock_url: str, stage: str | None) -> str:
    """The signed-policy text of a gateway in front of the mock at ``mock_url``, with
    ``pipeline = [stage]`` (the plugin's defaults), or empty when ``stage`` is None."""
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
        pipeline=[stage] if stage else [],
        plugins={stage: {}} if stage else None,
        deployments=[deployment],
    )
    return text + f'\n[[keys]]\nid = "bench"\nteam = "test"\nsha256 = "{api_key_sha256()}"\n'


def start_mock(sc: StageScenario, setup: Setup) -> Server:
    """Start ``veil mock-upstream`` and wait until it answers a chat call."""
    veil = default_veil_bin()
    ok, why = supports(veil, "mock-upstream")
    if not ok:
        raise BenchError(f"veil mock-upstream is not usable: {why}")
    port = free_port()
    sc.note(f"starting the mock upstream on 127.0.0.1:{port}")
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


def start_gateways(
    sc: StageScenario,
    setup: Setup,
    targets: list[str],
    *,
    command_prefix: Callable[[str], Sequence[str]] | None = None,
    extra_env: Mapping[str, str] | None = None,
    ready_timeout: float = 120,
) -> None:
    """Write and sign each target's policy, start the gateways, wait until they are ready.

    ``command_prefix(name)`` runs gateway ``name`` under another program
    (``bench.instructions``: valgrind), with ``extra_env`` added to its
    environment and ``ready_timeout`` seconds to start.
    """
    from veil.testing import GatewayProcess, PolicyKit

    assert setup.mock is not None
    kit = PolicyKit(setup.workdir)
    for name in targets:
        text = policy(setup.mock.base_url, None if name == CORE else sc.stage)
        if name != CORE:
            text += sc.policy_tail(name)
        path = kit.write(text, f"{name}.toml")
        sc.note(f"starting gateway {name}")
        setup.gateways[name] = GatewayProcess(
            path,
            kit.public_key_path,
            audience=AUDIENCE,
            state_dir=setup.state_dir(name),
            env={**(extra_env or {}), **(sc.gateway_env(setup, name) or {})},
            command_prefix=command_prefix(name) if command_prefix else (),
        )
    for name, gw in setup.gateways.items():
        try:
            gw.wait_ready(ready_timeout)
        except RuntimeError as err:
            raise BenchError(f"gateway {name} did not start: {err}") from None
        server = Server(name, gw.proc, gw.port, setup.workdir / f"{name}.log")
        setup.running[name] = Running(name, server, upstream=setup.mock)


def probe(url: str, stream: bool = False) -> tuple[int, dict[str, str], str]:
    """One chat call to the gateway at ``url``: (status, headers, start of the body)."""
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(url + CHAT_PATH, json=chat_body(stream), headers=headers, timeout=30)
    return r.status_code, dict(r.headers), r.text[:300]


def check_answers(setup: Setup, names: list[str]) -> None:
    """Each gateway in ``names`` answers 200 to a non-streaming and a streaming call."""
    for name in names:
        for stream in (False, True):
            status, _, text = probe(setup.base_url(name), stream)
            if status != 200:
                raise BenchError(f"gateway {name} answered {status} (stream={stream}): {text}")


# -- the plan -------------------------------------------------------------------------


def make_plan(
    targets: list[str], modes: list[str], conns: list[int], duration: int, warmup: int, rounds: int
) -> list[Step]:
    """Warm-ups (first round only), then every target in turn per mode and connections.

    The order of the targets alternates from one round to the next (and from one cell
    to the next): whatever favours the first or the second load of a pair (a neighbour's
    burst, a cache just warmed) falls on each target as often, with an even number of
    rounds."""
    steps: list[Step] = []
    for rnd in range(rounds):
        for m, mode in enumerate(modes):
            if rnd == 0 and warmup > 0:
                steps += [Step("warmup", t, mode, min(16, max(conns)), warmup) for t in targets]
            for k, c in enumerate(conns):
                cell = m * len(conns) + k
                order = targets if (rnd + cell) % 2 == 0 else targets[::-1]
                steps += [Step("measure", t, mode, c, duration, rnd) for t in order]
    return steps


def _errors(sample: Sample) -> str:
    load = sample.load
    return (
        f"{load.errors} errors in {load.requests} requests (non-2xx {load.non2xx}, "
        f"connect {load.connect_errors}, read {load.read_errors}, write {load.write_errors}, "
        f"timeout {load.timeouts})"
    )


def step_groups(steps: list[Step], paired: bool) -> list[list[int]]:
    """Indexes of the steps run together: one each, or with ``paired`` the steps of
    one kind, round, mode and connection count (every gateway of a cell)."""
    groups: list[list[int]] = []
    for i, step in enumerate(steps):
        if paired and groups:
            last = steps[groups[-1][-1]]
            if (last.kind, last.round, last.mode, last.conns) == (
                step.kind,
                step.round,
                step.mode,
                step.conns,
            ):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def run_plan(
    sc: StageScenario,
    setup: Setup,
    gen: LoadGenerator,
    steps: list[Step],
    result: dict[str, Any],
    paired: bool = False,
) -> Samples:
    """Run every step (with ``paired``, the gateways of a cell at the same time, each
    with its own load generator); count the requests served per gateway in
    ``result["requests_served"]``; stop (``BenchError``) at a load with errors or when
    a gateway exits. The measured samples."""
    body_files = {}
    for mode in MODES:
        path = setup.workdir / f"body-{mode}.json"
        path.write_bytes(chat_body_bytes(stream=mode == "stream"))
        body_files[mode] = path
    served = result.setdefault("requests_served", {})
    samples: Samples = {}
    groups = step_groups(steps, paired)
    progress = Progress(steps, alongside=frozenset(i for g in groups for i in g[1:]))

    def load(step: Step) -> Sample:
        body = sc.body_file(setup, step.target, step.mode, body_files[step.mode])
        return measure(gen, setup.sup, setup.running[step.target], step, {step.mode: body})

    with ThreadPoolExecutor(max_workers=max(1, len(setup.running))) as pool:
        for group in groups:
            for i in group:
                progress.before(i)
            sides = {i: sc.side_pid(setup, steps[i].target) for i in group}
            s0 = {i: tree_cpu_seconds(p) for i, p in sides.items() if p}
            loads = [pool.submit(load, steps[i]) for i in group]
            measured = [f.result() for f in loads]
            s1 = {i: tree_cpu_seconds(p) for i, p in sides.items() if p}
            if len(group) > 1:
                _share_upstream(measured)
            for i, sample in zip(group, measured, strict=True):
                step = steps[i]
                progress.after(i)
                n = sample.load.requests
                what = " ".join(step.label().split())
                served[step.target] = served.get(step.target, 0) + n
                if sample.load.errors or n == 0:
                    raise BenchError(f"{what}: {_errors(sample)}")
                if setup.gateways[step.target].proc.poll() is not None:
                    raise BenchError(f"gateway {step.target} exited during {what}")
                if step.kind == "measure":
                    side_ms = (s1[i] - s0[i]) * 1000 / n if i in s0 else None
                    cell = samples.setdefault((step.target, step.mode, step.conns), [])
                    cell.append((sample, side_ms))
    return samples


def _share_upstream(measured: list[Sample]) -> None:
    """Gateways loaded together share the mock: its CPU over a load's seconds
    served every gateway's requests, so it is divided by all of them (the
    loads' windows are the same seconds, give or take their start-up)."""
    total = sum(sample.load.requests for sample in measured)
    for sample in measured:
        if sample.upstream_cpu_ms_per_req is not None and total:
            mock_ms = sample.upstream_cpu_ms_per_req * sample.load.requests
            sample.upstream_cpu_ms_per_req = mock_ms / total


# -- results --------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def summarize(
    sc: StageScenario, samples: Samples, targets: list[str], modes: list[str], conns: list[int]
) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """The cells (per mode and connections: each target's aggregate and the ratios, in
    the scenario's JSON layout) and each gateway's median ratio over the cells (None when
    it was not measured)."""
    cells: list[dict[str, Any]] = []
    per_gateway: dict[str, list[float]] = {g: [] for g in sc.gateways}
    for mode in modes:
        for c in conns:
            aggs: dict[str, dict[str, Any]] = {}
            for t in targets:
                got = samples.get((t, mode, c), [])
                aggs[t] = aggregate([s for s, _ in got])
                side_ms = [r for _, r in got if r is not None]
                if side_ms:
                    aggs[t][sc.side_key] = statistics.median(side_ms)
            ratios: dict[str, float | None] = {}
            for g in sc.gateways:
                if g in targets:
                    r = _ratio(aggs[g]["cpu_ms_per_req"], aggs[CORE]["cpu_ms_per_req"])
                    ratios[g] = None if r is None else round(r, 3)
                    if r is not None:
                        per_gateway[g].append(r)
            if sc.single:
                cells.append(
                    {"mode": mode, "conns": c, **aggs, "ratio": ratios.get(sc.gateways[0])}
                )
            else:
                named = {f"{g}/core": r for g, r in ratios.items()}
                cells.append({"mode": mode, "conns": c, "ratios": named, **aggs})
    medians = {g: (round(statistics.median(v), 3) if v else None) for g, v in per_gateway.items()}
    return cells, medians


def _cell_ratio(sc: StageScenario, cell: dict[str, Any], gateway: str) -> float | None:
    """``gateway``'s ratio to core in ``cell``, whichever the JSON layout."""
    ratio: float | None = cell["ratio"] if sc.single else cell["ratios"][f"{gateway}/core"]
    return ratio


def _median_ratio(sc: StageScenario, result: dict[str, Any], gateway: str) -> float | None:
    """``gateway``'s median ratio over the cells, whichever the JSON layout."""
    med = result["median_ratio"]
    ratio: float | None = med if sc.single else med[gateway]
    return ratio


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _width(label: str, minimum: int) -> int:
    return max(minimum, len(label) + 2)


def upstream_line(result: dict[str, Any], targets: list[str]) -> str | None:
    """The mock upstream's CPU ms/req behind each gateway (median over the cells), or
    None when it was not measured."""
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
    if not mock:
        return None
    if result["meta"].get("paired"):  # one mock served the gateways loaded together
        return (
            "mock upstream CPU ms/req over every gateway's requests (loaded together), "
            "median over cells, read beside each: " + ", ".join(mock)
        )
    return "mock upstream CPU ms/req behind each gateway, median over cells: " + ", ".join(mock)


def render(sc: StageScenario, result: dict[str, Any], targets: list[str]) -> str:
    """The console report: the table, the scenario's lines, a verdict per target."""
    rounds = result["meta"]["rounds"]
    shown = [g for g in sc.gateways if g in targets]
    ratio_cols = [(g, _width(f"{g}/core", sc.ratio_width)) for g in shown]
    rps_cols = [(t, _width(f"{t} rps", sc.rps_width)) for t in targets]
    lines = [
        f"{sc.stage} stage: gateway CPU ms per request (process tree; median of {rounds} "
        f"round{'s' if rounds != 1 else ''}"
        f"{'; gateways loaded together' if result['meta'].get('paired') else ''}), "
        f"load generator {result['meta']['loadgen']}",
        "",
        f"{'mode':<10}{'conns':>6}"
        + "".join(f"{t:>9}" for t in targets)
        + "".join(f"{g + '/core':>{w}}" for g, w in ratio_cols)
        + "".join(f"{t + ' rps':>{w}}" for t, w in rps_cols),
    ]
    for cell in result["cells"]:
        lines.append(
            f"{cell['mode']:<10}{cell['conns']:>6}"
            + "".join(f"{_fmt(cell[t]['cpu_ms_per_req']):>9}" for t in targets)
            + "".join(f"{_fmt(_cell_ratio(sc, cell, g)) + 'x':>{w}}" for g, w in ratio_cols)
            + "".join(f"{_fmt(cell[t]['rps'], '.0f'):>{w}}" for t, w in rps_cols)
        )
    lines.append(
        f"{'median ratio over cells':<{16 + 9 * len(targets)}}"
        + "".join(f"{_fmt(_median_ratio(sc, result, g)) + 'x':>{w}}" for g, w in ratio_cols)
    )
    lines += sc.report_lines(result, targets)
    lines.append("")
    for g in sc.gateways:
        name = sc.target_name(g)
        ok = result["targets"].get(name)
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        med = _median_ratio(sc, result, g)
        if med is None and not sc.single:
            detail = f"({result['skipped'].get(g, 'not measured')})"
        else:
            label = "" if sc.single else f"{g}/core "
            detail = f"(median {label}{_fmt(med)}x, limit {sc.limit_of(g)}x)"
        lines.append(f"  {status}  {name} {detail}")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------


def build_parser(sc: StageScenario) -> argparse.ArgumentParser:
    """The command line: the scenario's module docstring is the description."""
    prog = f"python -m bench.{sc.stage}"
    the = "the target" if sc.single else "a target"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=sc.doc.split("\nExit codes")[0],
        epilog=f"exit codes: 0 ran (even if {the} failed), 1 setup/server/load failed or a "
        f"load saw errors,\n            2 usage, 3 --strict and {the} failed, 130 "
        f"interrupted\n\nexamples:\n  {prog}\n  {prog} --quick --json\n  {prog} {sc.example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quick = "3 s measurements, 1 round, 1 s warm-ups"
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{quick} ({sc.quick_time})" if sc.quick_time else quick,
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        default=None,
        metavar="S",
        help="seconds per measurement (default 6; 3 with --quick)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive,
        default=None,
        metavar="N",
        help="rounds of the interleaved plan, the targets' order alternating from one round "
        "to the next; medians are taken (default 4; 1 with --quick)",
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
    if not sc.single:
        letter = sc.select_option.lstrip("-")[0].upper()
        parser.add_argument(
            sc.select_option,
            dest="gateways",
            default=",".join(sc.gateways),
            metavar=f"{letter},{letter}",
            help=sc.select_help,
        )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="load the gateways of a cell at the same time, each with its own load "
        "generator and connections, instead of one after another: whatever else the "
        "machine does then falls on all of them alike (much less spread between rounds; "
        "each gateway gets a share of the cores, so ratios at 16 connections differ from "
        "a sequential run's)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (default auto: wrk when on PATH, else bench/loadgen.py)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--strict", action="store_true", help=f"exit 3 when {the} fails")
    parser.add_argument(
        "--keep-tmp",
        action="store_true",
        help=f"keep the temp dir ({sc.keeps}); kept anyway on failure",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=sc.default_out,
        help=f"JSON output (default {sc.default_out.relative_to(ROOT)})",
    )
    return parser


def _requested(
    sc: StageScenario, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> list[str]:
    """The gateways asked for (all of them for a single-gateway scenario)."""
    if sc.single:
        return list(sc.gateways)
    chosen = [g.strip() for g in args.gateways.split(",") if g.strip()]
    if not chosen or any(g not in sc.gateways for g in chosen):
        parser.error(
            f"{sc.select_option}: choose from {', '.join(sc.gateways)} (comma-separated), "
            f"got {args.gateways!r}"
        )
    return chosen


def _load_generator(sc: StageScenario, choice: str) -> LoadGenerator | None:
    """wrk, or bench/loadgen.py when wrk is missing (None: ``--loadgen wrk`` and no wrk)."""
    wrk = None
    if choice != "python":
        wrk = find_wrk()
        if wrk is None and choice == "wrk":
            sc.note("--loadgen wrk was requested but wrk is not on PATH (apt-get install wrk)")
            return None
        if wrk is None:
            sc.note("wrk not found on PATH: using the Python load generator (bench/loadgen.py)")
    return LoadGenerator(wrk=wrk)


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through finally: every process is stopped


def _measure(
    sc: StageScenario,
    setup: Setup,
    gen: LoadGenerator,
    requested: list[str],
    result: dict[str, Any],
) -> list[str]:
    """Start everything, check it, run the plan and judge it into ``result``; the
    targets measured (core first)."""
    meta = result["meta"]
    setup.mock = start_mock(sc, setup)
    gateways = sc.start_services(setup, requested, result)
    targets = [CORE, *gateways]
    if not sc.single:
        meta["targets"] = targets
    start_gateways(sc, setup, targets)
    sc.preflight(setup, gateways)
    modes, conns = meta["modes"], meta["connections"]
    steps = make_plan(targets, modes, conns, meta["duration_s"], meta["warmup_s"], meta["rounds"])
    samples = run_plan(sc, setup, gen, steps, result, paired=meta["paired"])
    sc.after_load(setup, result)
    cells, medians = summarize(sc, samples, targets, modes, conns)
    result["cells"] = cells
    result["median_ratio"] = medians[sc.gateways[0]] if sc.single else medians
    for g in sc.gateways:
        m = medians[g]
        result["targets"][sc.target_name(g)] = None if m is None else m <= sc.limit_of(g)
    return targets


def main(sc: StageScenario, argv: list[str] | None = None) -> int:
    """Run scenario ``sc`` from the command line ``argv``; the exit code."""
    parser = build_parser(sc)
    args = parser.parse_args(argv)
    requested = _requested(sc, args, parser)
    signal.signal(signal.SIGTERM, _on_sigterm)
    gen = _load_generator(sc, args.loadgen)
    if gen is None:
        return EXIT_SETUP
    result: dict[str, Any] = {
        "scenario": sc.stage,
        "meta": {
            "loadgen": gen.name,
            "duration_s": args.duration or (3 if args.quick else 6),
            "warmup_s": args.warmup if args.warmup is not None else (1 if args.quick else 2),
            "rounds": args.repeat or (1 if args.quick else 4),
            "connections": args.connections,
            "paired": args.paired,
            "modes": list(MODES),
            "limit": sc.limit,
            "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        },
    }
    if not sc.single:
        result["skipped"] = {
            g: f"not requested ({sc.select_option})" for g in sc.gateways if g not in requested
        }
    result.update(
        cells=[],
        median_ratio=None if sc.single else dict.fromkeys(sc.gateways),
        targets={},
        error=None,
    )
    workdir = Path(tempfile.mkdtemp(prefix=f"veil-bench-{sc.stage}-"))
    setup = Setup(workdir=workdir, sup=Supervisor(log_dir=workdir))
    code, keep, targets = EXIT_OK, args.keep_tmp, [CORE]
    try:
        targets = _measure(sc, setup, gen, requested, result)
    except (BenchError, ServerStartError, LoadError, RuntimeError) as err:
        keep = True
        setup.save_logs()
        result["error"] = f"{type(err).__name__}: {err}"
        sc.note(f"error: {err}")
        for name in setup.gateways:
            sc.note(f"last lines of gateway {name}'s log:\n{tail(workdir / f'{name}.log', 15)}")
        code = EXIT_SETUP
    except KeyboardInterrupt:
        sc.note("interrupted; every process stopped")
        code = EXIT_INTERRUPTED
    finally:
        setup.close()
        if keep:
            sc.note(f"kept temp dir ({sc.keeps}): {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if code == EXIT_INTERRUPTED:
        return code
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    elif code == EXIT_OK:
        print(render(sc, result, targets))
        print(f"JSON written to {args.out}")
    if code == EXIT_OK and args.strict and False in result["targets"].values():
        code = EXIT_TARGETS
    return code
