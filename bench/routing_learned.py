"""Learned-router scenario: decision latency, artifact load time and size.

Run with ``python -m bench.routing_learned`` (``make bench`` runs it). In one
process, on this CPU:

- the router: the shipped pretrained artifact when present (``--router`` to
  pick another), else one trained here on the vendored test subset;
- prompts: the vendored test subsets (and, when it exists, the shared dev data
  next to the repository, ``--data`` to pick files);
- measured per prompt, after a warm-up: one decision = ``predict`` +
  ``cluster`` + ``predict_output_tokens`` (what the stage calls), wall time and
  this thread's CPU time (the CPU figure is immune to other processes taking
  the shared cores); p50 / p99 / max over all prompts, repeated ``--rounds``
  times (the median round is reported);
- load: the median of 5 ``load(path, sha256)`` calls.

Judged: p99 decision latency (CPU) under 2 ms. Exit codes: 0 ran (even if the
target failed), 1 setup failed, 2 usage, 3 with ``--strict`` the target failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "routing"
VENDORED = sorted((PLUGIN / "tests" / "data").glob("*.jsonl"))
SHARED = ROOT.parent / "shared" / "data" / "routing"
TARGET_P99_MS = 2.0

try:  # installed with plugins/routing, or the source tree before that
    from veil_routing import learned
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(PLUGIN))
    from veil_routing import learned


def _prompts(files: list[Path]) -> list[str]:
    out = []
    for f in files:
        with f.open(encoding="utf-8") as fh:
            out.extend(json.loads(line)["prompt"] for line in fh if line.strip())
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router", type=Path, help="router artifact (default: the shipped one)")
    ap.add_argument("--data", type=Path, nargs="*", help="JSONL files whose prompts to route")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strict", action="store_true", help="exit 3 when the target fails")
    args = ap.parse_args(argv)

    files = args.data or VENDORED + sorted(SHARED.glob("*.jsonl"))
    prompts = _prompts(files)
    if not prompts:
        print("no prompts found: pass --data FILE.jsonl", file=sys.stderr)
        return 1
    path = args.router
    shipped = PLUGIN / "veil_routing" / "learned" / "pretrained"
    if path is None and shipped.is_dir():
        path = next(iter(sorted(shipped.glob("*.veilrouter"))), None)
    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "bench.veilrouter"
        rows = [json.loads(line) for f in VENDORED for line in f.open() if line.strip()]
        learned.train([r for r in rows if len(r["scores"]) == 2]).save(path)
    sha = learned.file_sha256(path)
    loads = []
    for _ in range(5):
        t = time.perf_counter()
        router = learned.load(path, sha)
        loads.append(time.perf_counter() - t)

    for p in prompts[:200]:  # warm-up
        router.predict(p)
    rounds = []
    for _ in range(args.rounds):
        wall, cpu = [], []
        for p in prompts:
            t0, c0 = time.perf_counter(), time.thread_time()
            router.predict(p)
            router.cluster(p)
            router.predict_output_tokens(p)
            c1, t1 = time.thread_time(), time.perf_counter()
            wall.append((t1 - t0) * 1e3)
            cpu.append((c1 - c0) * 1e3)
        rounds.append(
            {
                "wall_p50_ms": _pct(wall, 0.5),
                "wall_p99_ms": _pct(wall, 0.99),
                "cpu_p50_ms": _pct(cpu, 0.5),
                "cpu_p99_ms": _pct(cpu, 0.99),
                "cpu_max_ms": max(cpu),
            }
        )
    rounds.sort(key=lambda r: r["cpu_p99_ms"])
    med = rounds[len(rounds) // 2]
    result = {
        "router": path.name,
        "models": len(router.models),
        "artifact_bytes": path.stat().st_size,
        "load_ms": statistics.median(loads) * 1e3,
        "prompts": len(prompts),
        **{k: round(v, 4) for k, v in med.items()},
        "target_cpu_p99_ms": TARGET_P99_MS,
        "pass": med["cpu_p99_ms"] < TARGET_P99_MS,
    }
    print(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 3 if args.strict and not result["pass"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
