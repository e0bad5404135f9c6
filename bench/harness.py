"""Orchestration: start the servers, run the measurement plan, collect the samples.

The plan is interleaved (for each mode, for each connection count, every target in turn)
so that the numbers that get compared are taken close together in time on a noisy
machine. With ``--repeat N`` the whole plan runs N times and the median is reported.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import veil_target
from bench.cpu import host_busy_between, host_cpu_times, tree_cpu_seconds
from bench.load import LoadGenerator, LoadResult
from bench.payloads import API_KEY, chat_body_bytes
from bench.procs import Server, Supervisor, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAT_PATH = "/v1/chat/completions"
ALL_TARGETS = ("mock", "passthrough", "veil")
MODES = ("nonstream", "stream")
STEP_OVERHEAD_S = 0.4
"""Rough per-step cost beyond its duration (process start, CPU sampling), for the ETA."""


class TargetUnavailable(RuntimeError):
    """A target or mock that was asked for explicitly cannot be run."""


@dataclass
class Config:
    """Everything a run needs; built by ``bench.cli`` from the command line."""

    connections: list[int]
    duration_s: int
    warmup_s: int
    modes: list[str]
    targets: list[str] | None
    """None: every target that can run (veil is skipped when its CLI is missing)."""
    mock: str
    soak_s: int
    soak_conns: int
    soak_mode: str
    repeat: int
    pin: str
    loadgen: str
    wrk_threads: int
    veil_bin: Path
    veil_args: list[str]
    """Extra arguments appended to ``veil serve`` (``--veil-arg``)."""
    start_timeout_s: float
    keep_tmp: bool
    quick: bool = False


@dataclass
class Step:
    """One unit of the plan."""

    kind: str  # "warmup" | "measure" | "soak"
    target: str
    mode: str
    conns: int
    duration_s: int
    round: int = 0

    def label(self) -> str:
        what = {"warmup": "warm-up", "measure": "measure", "soak": "soak"}[self.kind]
        return f"{what:<7} {self.target:<11} {self.mode:<9} c={self.conns:<4} {self.duration_s}s"


@dataclass
class Sample:
    """One measurement: what the load generator saw plus server CPU."""

    load: LoadResult
    cpu_ms_per_req: float | None
    upstream_cpu_ms_per_req: float | None
    host_busy_pct: float
    host_steal_pct: float

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.load.to_dict(),
            "cpu_ms_per_req": self.cpu_ms_per_req,
            "upstream_cpu_ms_per_req": self.upstream_cpu_ms_per_req,
            "host_busy_pct": self.host_busy_pct,
            "host_steal_pct": self.host_steal_pct,
        }


@dataclass
class Running:
    """A started target: where to send requests and whose CPU to count."""

    name: str
    server: Server
    upstream: Server | None = None

    @property
    def url(self) -> str:
        return self.server.base_url + CHAT_PATH


@dataclass
class Outcome:
    """What a run produced (also on failure, as far as it got)."""

    meta: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    samples: dict[tuple[str, str, int], list[Sample]] = field(default_factory=dict)
    soak: dict[str, Any] | None = None
    error: str | None = None


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(samples: list[Sample]) -> dict[str, Any]:
    """Median over repeats of rps/latency/CPU; errors and requests are summed."""
    return {
        "rps": _median([s.load.rps for s in samples]),
        "p50_ms": _median([s.load.p50_ms for s in samples]),
        "p99_ms": _median([s.load.p99_ms for s in samples]),
        "errors": sum(s.load.errors for s in samples),
        "requests": sum(s.load.requests for s in samples),
        "cpu_ms_per_req": _median([s.cpu_ms_per_req for s in samples]),
        "upstream_cpu_ms_per_req": _median([s.upstream_cpu_ms_per_req for s in samples]),
        "host_busy_pct": _median([s.host_busy_pct for s in samples]),
        "host_steal_pct": _median([s.host_steal_pct for s in samples]),
        "samples": [s.to_dict() for s in samples],
    }


def split_cpus(pin: str) -> tuple[list[int] | None, list[int] | None]:
    """(server CPUs, load generator CPUs) for ``--pin``; (None, None) means no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "split" and len(cpus) >= 2:
        return cpus[:-1], cpus[-1:]
    return None, None


def plan(cfg: Config, targets: list[str], soak: bool) -> list[Step]:
    """The ordered list of steps (interleaved by target, see module docstring)."""
    warm_conns = min(16, max(cfg.connections))
    steps: list[Step] = []
    for rnd in range(cfg.repeat):
        for mode in cfg.modes:
            if rnd == 0 and cfg.warmup_s > 0:
                steps += [Step("warmup", t, mode, warm_conns, cfg.warmup_s) for t in targets]
            for conns in cfg.connections:
                steps += [Step("measure", t, mode, conns, cfg.duration_s, rnd) for t in targets]
    if soak:
        steps.append(Step("soak", "veil", cfg.soak_mode, cfg.soak_conns, cfg.soak_s))
    return steps


class Progress:
    """One line per step on stderr, printed before it starts, with an ETA for the run."""

    def __init__(
        self, steps: list[Step], stream: Any = sys.stderr, alongside: frozenset[int] = frozenset()
    ) -> None:
        """``alongside``: indexes of steps that run at the same time as the step
        before them (they add nothing to the time left)."""
        self.steps = steps
        self.stream = stream
        self.alongside = alongside
        self.started = time.monotonic()
        self.planned_done = 0.0

    def _cost(self, index: int) -> float:
        return 0.0 if index in self.alongside else self.steps[index].duration_s + STEP_OVERHEAD_S

    def before(self, index: int) -> None:
        step = self.steps[index]
        remaining = sum(self._cost(i) for i in range(index, len(self.steps)))
        elapsed = time.monotonic() - self.started
        factor = elapsed / self.planned_done if self.planned_done > 0 else 1.0
        eta = remaining * max(1.0, factor)
        width = len(str(len(self.steps)))
        print(
            f"[{index + 1:>{width}}/{len(self.steps)}] {step.label():<48} "
            f"ETA {int(eta) // 60}:{int(eta) % 60:02d}",
            file=self.stream,
            flush=True,
        )

    def after(self, index: int) -> None:
        self.planned_done += self._cost(index)


def note(message: str) -> None:
    """A status message on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def pick_targets(cfg: Config, outcome: Outcome) -> list[str]:
    """Resolve which targets run; veil is skipped (with a reason) while its CLI is missing."""
    wanted = list(cfg.targets or ALL_TARGETS)
    if "veil" in wanted:
        for sub in (("serve",), ("policy", "keygen"), ("policy", "sign")):
            ok, why = veil_target.supports(cfg.veil_bin, *sub)
            if not ok:
                if cfg.targets is not None:
                    raise TargetUnavailable(f"target veil was requested but {why}")
                wanted.remove("veil")
                reason = f"veil CLI not usable yet: {why}"
                outcome.skipped.append({"target": "veil", "reason": reason})
                note(f"SKIP target (3) veil: {reason}")
                break
    return wanted


def pick_mock(cfg: Config) -> tuple[str, str]:
    """('veil' | 'fallback', why) according to ``--mock``."""
    if cfg.mock == "fallback":
        return "fallback", "--mock fallback"
    ok, why = veil_target.supports(cfg.veil_bin, "mock-upstream")
    if ok:
        return "veil", "veil mock-upstream is available"
    if cfg.mock == "veil":
        raise TargetUnavailable(f"--mock veil was requested but {why}")
    return "fallback", f"veil mock-upstream not usable ({why})"


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def start_targets(
    cfg: Config,
    sup: Supervisor,
    workdir: Path,
    targets: list[str],
    mock_kind: str,
    server_cpus: list[int] | None,
) -> dict[str, Running]:
    """Start the mock, then the passthrough and veil in front of it; wait until all answer."""
    body = chat_body_bytes(stream=False)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    env = _python_env()

    def start(name: str, argv: Callable[[int], list[str]], timeout: float) -> Server:
        port = free_port()
        note(f"starting {name} on 127.0.0.1:{port}")
        server = sup.start(name, argv(port), port, env=env, cwd=REPO_ROOT, cpus=server_cpus)
        sup.wait_ready(server, server.base_url + CHAT_PATH, body, headers, timeout=timeout)
        return server

    if mock_kind == "veil":
        mock = start("mock", lambda p: veil_target.mock_command(cfg.veil_bin, p), 60)
    else:
        mock = start(
            "mock",
            lambda p: [sys.executable, "-m", "bench._fallback_mock", "--port", str(p)],
            cfg.start_timeout_s,
        )
    running: dict[str, Running] = {}
    if "mock" in targets:
        running["mock"] = Running("mock", mock)
    if "passthrough" in targets:
        pt = start(
            "passthrough",
            lambda p: [
                sys.executable,
                "-m",
                "bench.passthrough",
                "--upstream",
                mock.base_url,
                "--port",
                str(p),
            ],
            cfg.start_timeout_s,
        )
        running["passthrough"] = Running("passthrough", pt, upstream=mock)
    if "veil" in targets:
        files = veil_target.prepare(cfg.veil_bin, workdir / "veil", mock.base_url)
        veil = start(
            "veil",
            lambda p: veil_target.serve_command(cfg.veil_bin, files, p, cfg.veil_args),
            max(cfg.start_timeout_s, 60),
        )
        running["veil"] = Running("veil", veil, upstream=mock)
    return running


def measure(
    gen: LoadGenerator,
    sup: Supervisor,
    target: Running,
    step: Step,
    body_files: dict[str, Path],
) -> Sample:
    """Run one load against ``target`` and attribute server CPU to the requests served."""
    pid = target.server.pid
    up_pid = target.upstream.pid if target.upstream else None
    cpu0 = tree_cpu_seconds(pid)
    up0 = tree_cpu_seconds(up_pid) if up_pid else 0.0
    host0 = host_cpu_times()
    load = gen.run(sup, target.url, step.conns, step.duration_s, body_files[step.mode], API_KEY)
    host1 = host_cpu_times()
    cpu1 = tree_cpu_seconds(pid)
    up1 = tree_cpu_seconds(up_pid) if up_pid else 0.0
    busy, steal = host_busy_between(host0, host1)
    n = load.requests
    return Sample(
        load=load,
        cpu_ms_per_req=(cpu1 - cpu0) * 1000 / n if n else None,
        upstream_cpu_ms_per_req=(up1 - up0) * 1000 / n if n and up_pid else None,
        host_busy_pct=busy,
        host_steal_pct=steal,
    )


def run(cfg: Config, outcome: Outcome) -> None:
    """Execute a whole benchmark run, filling ``outcome``; every process is stopped at the end.

    Raises ServerStartError / VeilSetupError / TargetUnavailable / LoadError on failure
    (``outcome`` then holds what was measured so far).
    """
    targets = pick_targets(cfg, outcome)
    mock_kind, mock_why = pick_mock(cfg)
    note(f"mock upstream: {mock_kind} ({mock_why})")
    server_cpus, gen_cpus = split_cpus(cfg.pin)
    gen = LoadGenerator(
        wrk=None if cfg.loadgen == "python" else _wrk_or_fail(cfg.loadgen),
        wrk_threads=cfg.wrk_threads,
        cpus=gen_cpus,
    )
    soak = cfg.soak_s > 0 and "veil" in targets
    if cfg.soak_s > 0 and not soak:
        outcome.soak = {"skipped": "target veil is not running"}
    steps = plan(cfg, targets, soak)
    outcome.meta.update(
        {
            "targets": targets,
            "mock": mock_kind,
            "loadgen": gen.name,
            "pin": {"mode": cfg.pin, "servers": server_cpus, "loadgen": gen_cpus},
            "veil_bin": str(cfg.veil_bin),
            "veil_args": cfg.veil_args,
        }
    )
    note(f"load generator: {gen.name}; pinning: {cfg.pin}")
    workdir = Path(tempfile.mkdtemp(prefix="veil-bench-"))
    sup = Supervisor(log_dir=workdir)
    keep = cfg.keep_tmp
    try:
        body_files = {}
        for mode in MODES:
            path = workdir / f"body-{mode}.json"
            path.write_bytes(chat_body_bytes(stream=mode == "stream"))
            body_files[mode] = path
        running = start_targets(cfg, sup, workdir, targets, mock_kind, server_cpus)
        outcome.meta["pids"] = {name: r.server.pid for name, r in running.items()}
        progress = Progress(steps)
        for i, step in enumerate(steps):
            progress.before(i)
            sample = measure(gen, sup, running[step.target], step, body_files)
            progress.after(i)
            if step.kind == "measure":
                outcome.samples.setdefault((step.target, step.mode, step.conns), []).append(sample)
            elif step.kind == "soak":
                outcome.soak = {
                    "target": "veil",
                    "mode": step.mode,
                    "conns": step.conns,
                    "duration_s": step.duration_s,
                    **sample.to_dict(),
                }
            elif sample.load.errors:
                note(f"warm-up of {step.target} {step.mode}: {sample.load.errors} errors")
    except Exception:
        keep = True  # leave the server logs for inspection
        raise
    finally:
        sup.stop_all()
        if keep:
            note(f"kept temp dir (server logs, policy, keys): {workdir}")
        else:
            _rmtree(workdir)


def _wrk_or_fail(choice: str) -> str | None:
    from bench.load import find_wrk

    wrk = find_wrk()
    if wrk is None and choice == "wrk":
        raise TargetUnavailable("--loadgen wrk was requested but wrk is not on PATH")
    if wrk is None:
        note("wrk not found on PATH: using the Python load generator (bench/loadgen.py)")
    return wrk


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
