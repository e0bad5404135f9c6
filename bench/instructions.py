"""Instructions per request: what a stage costs, counted exactly by valgrind.

CPU time on a shared machine moves by 5 to 10% from one run to the next (two
identical core gateways measure 0.99x to 1.08x against each other here), so
a change of a few per cent to a stage cannot be seen in ``make bench``. The
number of instructions a request executes does not move: the same requests
count the same, to about 1%, run after run. This tool counts them.

For a stage scenario (``budget``, ``cache``, ``audit``: the gateways of
``python -m bench.<scenario>``), it starts the mock upstream and every
gateway, the gateways under valgrind's callgrind with counting off; then,
one gateway at a time, it sends warm-up requests, turns counting on, sends
``--requests`` requests one after another (keep-alive, like wrk at one
connection; the bodies the scenario uses: the cache's miss path and core get
never-repeated ones), turns counting off and reads the total. It prints each
gateway's user-space instructions per request and its ratio to core.

A diagnostic, like ``bench.serve_inprocess``, not the targets' judge: the
targets are about CPU time, which also holds the kernel's work (sockets,
wake-ups) that callgrind does not count. A stage's extra work is nearly all
Python in user space, so its instruction ratio is larger than its CPU-time
ratio. Under valgrind a request takes ~50 times longer, so work a process
does per second of wall time (the SQLite store's fold, every second) is
counted ~50 times too often; it is small against a request (under 2% for
the budget stage).

    python -m bench.instructions budget                   # core, sqlite, redis
    python -m bench.instructions cache --mode stream --requests 200
    python -m bench.instructions audit --json

Needs valgrind (``apt-get install valgrind``). Exit codes: 0 measured,
1 a gateway or a request failed, 2 usage, 3 valgrind is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stage_cpu
from bench.harness import CHAT_PATH, MODES
from bench.payloads import API_KEY, chat_body_bytes
from bench.procs import Supervisor

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_VALGRIND = 0, 1, 2, 3
SCENARIOS = ("budget", "cache", "audit")
MARKER = b"__BENCH_SEQ__"
"""What bench/wrk_post.lua replaces with a value unique to each request."""


def scenario(name: str) -> stage_cpu.StageScenario:
    """The stage scenario ``name`` of ``SCENARIOS``."""
    if name == "budget":
        from bench.budget import BudgetScenario

        return BudgetScenario()
    if name == "cache":
        from bench.cache import CacheScenario

        return CacheScenario()
    if name == "audit":
        from bench.audit import AuditScenario

        return AuditScenario()
    raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")


def callgrind_prefix(out_dir: Path, name: str) -> list[str]:
    """The command prefix that runs a gateway under callgrind, counting off."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_dir / name}.%p",
    ]


def read_total(path: Path) -> int:
    """The instructions counted in the callgrind dump at ``path`` (its
    ``totals:`` line, the file's last; its ``summary:`` line near the top
    may say 0).

    :raises ValueError: no ``totals:`` line (yet: the dump is being written).
    """
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise ValueError(f"no totals in callgrind output {path}")


def bodies(template: bytes) -> Iterator[bytes]:
    """``template`` for every request, made unique per request when it holds
    :data:`MARKER` (as wrk_post.lua does)."""
    if MARKER not in template:
        return itertools.repeat(template)
    return (template.replace(MARKER, b"i-%d" % i, 1) for i in itertools.count())


def _control(pid: int, *args: str) -> None:
    done = subprocess.run(
        ["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {done.stderr.strip()}")


def count(
    url: str, pid: int, dumps: Path, name: str, body: Iterator[bytes], warmup: int, requests: int
) -> float:
    """Instructions per request of the gateway at ``url`` (process ``pid``,
    under callgrind dumping into ``dumps``) over ``requests`` sequential calls.

    :raises RuntimeError: a call was not answered 200, or callgrind did not dump.
    """
    import httpx

    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:

        def call() -> None:
            r = client.post(CHAT_PATH, content=next(body))
            if r.status_code != 200:
                raise RuntimeError(f"gateway {name} answered {r.status_code}: {r.text[:200]}")

        for _ in range(warmup):
            call()
        _control(pid, "-z")
        _control(pid, "-i", "on")
        for _ in range(requests):
            call()
        _control(pid, "-i", "off")
        before = set(dumps.glob(f"{name}.{pid}*"))
        _control(pid, "-d")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = [p for p in dumps.glob(f"{name}.{pid}*") if p not in before]
        with contextlib.suppress(ValueError):
            if new:
                return read_total(new[0]) / requests
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no dump for gateway {name}")


def measure(args: argparse.Namespace, note: Callable[[str], None]) -> dict[str, Any]:
    """Run the scenario's gateways under callgrind; the result document."""
    sc = scenario(args.scenario)
    workdir = Path(tempfile.mkdtemp(prefix="veil-instr-"))
    dumps = workdir / "callgrind"
    dumps.mkdir()
    setup = stage_cpu.Setup(workdir=workdir, sup=Supervisor(workdir))
    result: dict[str, Any] = {"skipped": {}}
    try:
        gateways = sc.start_services(setup, list(sc.gateways), result)
        targets = [stage_cpu.CORE, *gateways]
        setup.mock = stage_cpu.start_mock(sc, setup)
        note("starting the gateways under callgrind")
        stage_cpu.start_gateways(
            sc,
            setup,
            targets,
            command_prefix=lambda name: callgrind_prefix(dumps, name),
            extra_env={"PYTHONHASHSEED": "0"},
            ready_timeout=600,
        )
        body_path = workdir / f"body-{args.mode}.json"
        body_path.write_bytes(chat_body_bytes(stream=args.mode == "stream"))
        per_request: dict[str, float] = {}
        for name in targets:
            template = sc.body_file(setup, name, args.mode, body_path).read_bytes()
            gw = setup.gateways[name]
            note(f"counting gateway {name}: {args.requests} requests ({args.mode})")
            per_request[name] = count(
                gw.url, gw.proc.pid, dumps, name, bodies(template), args.warmup, args.requests
            )
        core = per_request[stage_cpu.CORE]
        return {
            "scenario": args.scenario,
            "mode": args.mode,
            "requests": args.requests,
            "warmup": args.warmup,
            **result,
            "gateways": {
                name: {
                    "instructions_per_request": round(n),
                    "added": round(n - core),
                    "ratio": round(n / core, 4),
                }
                for name, n in per_request.items()
            },
        }
    finally:
        setup.close()
        shutil.rmtree(workdir, ignore_errors=True)


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['scenario']} ({result['mode']}): user-space instructions per request "
        f"(callgrind, {result['requests']} requests each)",
        f"{'gateway':10s} {'instructions':>13s} {'added':>10s} {'ratio':>8s}",
    ]
    for name, g in result["gateways"].items():
        lines.append(
            f"{name:10s} {g['instructions_per_request']:13,d} {g['added']:+10,d} {g['ratio']:7.4f}x"
        )
    for name, why in result.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", choices=SCENARIOS, help="the stage scenario to count")
    parser.add_argument("--mode", choices=MODES, default="nonstream", help="default nonstream")
    parser.add_argument(
        "--requests", type=int, default=300, help="requests counted per gateway (default 300)"
    )
    parser.add_argument(
        "--warmup", type=int, default=30, help="requests before counting (default 30)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests < 1 or args.warmup < 0:
        print("error: --requests must be at least 1 and --warmup at least 0", file=sys.stderr)
        return EXIT_USAGE
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(
            f"error: {' and '.join(missing)} not found; install valgrind "
            "(apt-get install valgrind) and run again",
            file=sys.stderr,
        )
        return EXIT_NO_VALGRIND
    os.environ.setdefault("VEIL_AUDIT_HMAC_KEY", os.urandom(32).hex())

    def note(message: str) -> None:
        print(f"bench.instructions: {message}", file=sys.stderr, flush=True)

    try:
        result = measure(args, note)
    except Exception as e:  # noqa: BLE001 - one line saying what failed, exit 1
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result) if args.json else render(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
