"""Command line of the benchmark harness (``python -m bench`` / ``python bench/run.py``)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from bench.harness import ALL_TARGETS, MODES, Config, Outcome, TargetUnavailable, note, run
from bench.load import LoadError
from bench.procs import ServerStartError
from bench.report import build_document, render_text
from bench.veil_target import VeilSetupError, default_veil_bin

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_TARGETS = 0, 1, 2, 3
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"

DESCRIPTION = """\
Benchmark veil against two baselines measured in the same run, on loopback:

  (1) mock         the mock upstream, hit directly (`veil mock-upstream`, or
                   bench/_fallback_mock.py while that does not exist)
  (2) passthrough  bench/passthrough.py: bare Starlette + uvicorn(uvloop, httptools) +
                   one pooled aiohttp session forwarding raw bytes to the mock. The floor
                   any Python gateway stands on.
  (3) veil         `veil serve` with a signed bench policy and an empty plugin pipeline
                   (the core only), in front of the same mock. Skipped, with a message,
                   while the veil CLI is not installed.

Each target is measured non-streaming and streaming (stream: true, the whole SSE stream
counts) at every connection count, interleaved so compared numbers are taken close in
time. Per measurement: requests/s, p50/p99 latency, errors (non-2xx and socket errors)
and the server's CPU time per request (user+sys from /proc, whole process tree), which
the load generator disturbs least. Then ratios: veil vs passthrough and vs mock for
throughput and CPU/request, and veil's added latency over the mock at 1 connection vs
the passthrough's. Finally a soak: veil at 256 connections must show zero errors.

The load generator is wrk (bench/wrk_post.lua) when it is on PATH, else the Python
generator bench/loadgen.py."""

EPILOG = """\
targets (printed PASS/FAIL; --strict turns a FAIL into exit code 3):
  veil CPU/request <= 1.3x passthrough at every connection count > 1, both modes
  veil throughput  >= 0.75x passthrough at every connection count, both modes
  veil added latency (p50 and p99) <= 1.5x passthrough's, at 1 connection, both modes
  soak: zero errors

exit codes: 0 ran (even if targets failed), 1 a server/setup/load generator failed,
            2 usage error, 3 --strict and a target failed, 130 interrupted

examples:
  .venv/bin/python -m bench                      # full run, ~4 minutes
  .venv/bin/python -m bench --quick --connections 1,16 --soak-seconds 0
  .venv/bin/python -m bench --targets mock,passthrough --repeat 3 --json > r.json
"""


def _conns(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        msg = f"not a comma-separated list of integers: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("connection counts must be integers >= 1")
    return sorted(set(values))


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join(allowed)} (comma-separated), got {text!r}"
            )
        return [a for a in allowed if a in values]

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its --help is the user manual)."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to measure")
    g.add_argument(
        "--connections",
        type=_conns,
        default=[1, 16, 64],
        metavar="N,N,...",
        help="concurrent connections per measurement (default: 1,16,64)",
    )
    g.add_argument(
        "--duration",
        type=_positive,
        default=None,
        metavar="S",
        help="seconds per measurement (default: 10; 3 with --quick)",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="3 s measurements and, unless --soak-seconds is given, a 10 s soak",
    )
    g.add_argument(
        "--warmup",
        type=_non_negative,
        default=1,
        metavar="S",
        help="warm-up seconds per target and mode before measuring (default: 1)",
    )
    g.add_argument(
        "--modes",
        type=_choices(MODES),
        default=list(MODES),
        metavar="M,M",
        help="nonstream, stream or both (default: both)",
    )
    g.add_argument(
        "--targets",
        type=_choices(ALL_TARGETS),
        default=None,
        metavar="T,T",
        help="subset of mock,passthrough,veil; named targets are required "
        "(default: all that can run; veil is skipped while missing)",
    )
    g.add_argument(
        "--repeat",
        type=_positive,
        default=1,
        metavar="N",
        help="run the whole plan N times and report medians (default: 1)",
    )
    g.add_argument(
        "--soak-seconds",
        type=_non_negative,
        default=None,
        metavar="S",
        help="veil soak duration, 0 disables (default: 30; 10 with --quick)",
    )
    g.add_argument(
        "--soak-connections",
        type=_positive,
        default=256,
        metavar="N",
        help="soak connections (default: 256)",
    )
    g.add_argument(
        "--soak-mode",
        choices=MODES,
        default="nonstream",
        help="request kind for the soak (default: nonstream)",
    )
    g = p.add_argument_group("how")
    g.add_argument(
        "--mock",
        choices=("auto", "fallback", "veil"),
        default="auto",
        help="mock upstream: `veil mock-upstream` or bench/_fallback_mock.py "
        "(default auto: veil's when available)",
    )
    g.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (default auto: wrk when on PATH)",
    )
    g.add_argument(
        "--wrk-threads",
        type=_positive,
        default=1,
        metavar="N",
        help="wrk threads, capped at the connection count (default: 1)",
    )
    g.add_argument(
        "--pin",
        choices=("off", "split"),
        default="off",
        help="split: load generator on the last CPU, servers on the others "
        "(default: off; see bench/README.md for why)",
    )
    g.add_argument(
        "--veil-bin",
        type=Path,
        default=None,
        metavar="PATH",
        help="the veil executable (default: veil next to this Python)",
    )
    g.add_argument(
        "--veil-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `veil serve`, repeatable "
        "(e.g. --veil-arg=--log-level --veil-arg=warning)",
    )
    g.add_argument(
        "--start-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a server may take to answer its first request (default: 30)",
    )
    g.add_argument(
        "--keep-tmp",
        action="store_true",
        help="keep the temp dir (server logs, policy, keys); kept anyway on failure",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="FILE",
        help="JSON results file (default: bench/results/latest.json)",
    )
    g.add_argument(
        "--json", action="store_true", help="print the JSON document to stdout instead of the table"
    )
    g.add_argument("--strict", action="store_true", help="exit 3 when a target FAILs")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve defaults that depend on other flags."""
    duration = args.duration if args.duration is not None else (3 if args.quick else 10)
    soak = args.soak_seconds if args.soak_seconds is not None else (10 if args.quick else 30)
    return Config(
        connections=args.connections,
        duration_s=duration,
        warmup_s=args.warmup,
        modes=args.modes,
        targets=args.targets,
        mock=args.mock,
        soak_s=soak,
        soak_conns=args.soak_connections,
        soak_mode=args.soak_mode,
        repeat=args.repeat,
        pin=args.pin,
        loadgen=args.loadgen,
        wrk_threads=args.wrk_threads,
        veil_bin=args.veil_bin or default_veil_bin(),
        veil_args=args.veil_arg,
        start_timeout_s=args.start_timeout,
        keep_tmp=args.keep_tmp,
        quick=args.quick,
    )


def _display(path: Path) -> str:
    """``path`` relative to the current directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through finally: every server is stopped


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the process exit code."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    outcome = Outcome()
    code = EXIT_OK
    try:
        run(cfg, outcome)
    except (ServerStartError, VeilSetupError, TargetUnavailable, LoadError) as err:
        outcome.error = f"{type(err).__name__}: {err}"
        note(f"error: {err}")
        code = EXIT_SERVER
    except KeyboardInterrupt:
        note("interrupted; all servers stopped")
        return 130
    doc = build_document(cfg, outcome)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render_text(doc))
        print(f"\nJSON written to {_display(args.out)}")
    if code == EXIT_OK and args.strict and doc["targets_failed"]:
        code = EXIT_TARGETS
    return code


if __name__ == "__main__":
    sys.exit(main())
