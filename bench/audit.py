"""Audit scenario: the CPU the ``audit`` stage adds to a call.

Run with ``python -m bench.audit`` (``make bench`` runs it after the budget scenario).
Everything is measured in one run, on loopback, in front of one ``veil mock-upstream``:

- ``core``: ``veil serve`` with an empty pipeline (the core only), the baseline;
- ``audit``: ``veil serve`` with ``pipeline = ["audit"]`` and its defaults: one sealed
  record per call (HMAC-SHA256 hash chain) copied into the memory-mapped JSONL
  file in the gateway's state dir before the call is answered (group commit, no
  fsync), plus the audit metrics.

Before measuring, a non-streaming and a streaming call to each gateway must succeed
and the audit gateway must have written a record for each, or the run stops (exit 1).
After the load, there must be a record for every call served (and for the calls in
flight when a load ended), and the file must verify (``veil audit verify`` logic), or
the run stops.

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

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import stage_cpu
from bench.stage_cpu import BenchError, Setup, StageScenario

KEY_ENV = "VEIL_AUDIT_HMAC_KEY"
BENCH_KEY = "bench-audit-hmac-key-not-a-secret"


def audit_dir(setup: Setup) -> Path:
    """Where the audit gateway's file sink writes."""
    return setup.state_dir("audit") / "audit"


def call_records(directory: Path) -> list[dict[str, Any]]:
    """The ``call`` records of every audit file in ``directory``, oldest first."""
    import orjson
    from veil_audit.files import read_records_bytes

    out = []
    for path in sorted(directory.glob("audit*.jsonl")):
        for line in read_records_bytes(path).splitlines():
            record = orjson.loads(line)
            if record.get("event") == "call":
                out.append(record)
    return out


def check_records(setup: Setup, expected: int) -> dict[str, Any]:
    """The audit gateway wrote one record per call and the chain verifies."""
    from veil_audit.verify import verify

    directory = audit_dir(setup)
    records = call_records(directory)
    # the load generator leaves calls in flight when it stops: those are recorded
    # too (200 when the gateway finished them, 499 when the client went first)
    odd = sum(1 for r in records if r["status"] not in (200, 499))
    if len(records) < expected or odd:
        raise BenchError(
            f"the audit gateway served {expected} calls but wrote {len(records)} records "
            f"({odd} with a status other than 200 or 499)"
        )
    verdict = verify(sorted(directory.glob("audit*.jsonl")), BENCH_KEY.encode())
    if not verdict.ok:
        raise BenchError(f"the audit files do not verify: {verdict.problem}")
    sizes = [len(json.dumps(r, separators=(",", ":"))) for r in records[-1000:]]
    return {"records": len(records), "median_record_bytes": int(statistics.median(sizes))}


class AuditScenario(StageScenario):
    """The audit stage with its defaults; its records are checked before and after."""

    stage = "audit"
    gateways = ("audit",)
    limit = 1.10
    keeps = "policies, keys, logs, audit files"

    def gateway_env(self, setup: Setup, gateway: str) -> dict[str, str] | None:
        return {KEY_ENV: BENCH_KEY}

    def preflight(self, setup: Setup, gateways: list[str]) -> None:
        """Both gateways answer, and the audit gateway recorded both calls."""
        super().preflight(setup, gateways)
        check_records(setup, 2)
        self.note("the audit gateway writes one verified record per call")

    def after_load(self, setup: Setup, result: dict[str, Any]) -> None:
        """``records``: a record for every call served, and the chain verifies."""
        result["records"] = check_records(setup, result["requests_served"]["audit"] + 2)

    def report_lines(self, result: dict[str, Any], targets: list[str]) -> list[str]:
        rec = result.get("records") or {}
        if not rec:
            return []
        return [
            f"records written: {rec['records']} (one per call served or in flight when a load "
            f"ended; chain verified); median record {rec['median_record_bytes']} bytes"
        ]


def main(argv: list[str] | None = None) -> int:
    return stage_cpu.main(AuditScenario(), argv)


if __name__ == "__main__":
    sys.exit(main())
