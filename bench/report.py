"""Turning samples into the JSON document, the ratios, the PASS/FAIL targets and the table.

Ratios (all computed from medians of the same run):

* throughput ratio  = target rps / baseline rps              (higher is better)
* CPU ratio         = target CPU ms/req / baseline CPU ms/req (lower is better)
* added latency     = target p50 (or p99) - mock p50 (or p99), at 1 connection;
  added-latency ratio = veil added / passthrough added        (lower is better)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.harness import ALL_TARGETS, MODES, Config, Outcome, aggregate

CPU_LIMIT = 1.3
THROUGHPUT_LIMIT = 0.75
LATENCY_LIMIT = 1.5


@dataclass(frozen=True)
class Check:
    """One PASS/FAIL target."""

    name: str
    value: float | None
    limit: float
    higher_is_better: bool
    detail: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "N/A"
        ok = self.value >= self.limit if self.higher_is_better else self.value <= self.limit
        return "PASS" if ok else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _round(self.value, 3),
            "limit": self.limit,
            "op": ">=" if self.higher_is_better else "<=",
            "status": self.status,
            "detail": self.detail,
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def build_document(cfg: Config, outcome: Outcome) -> dict[str, Any]:
    """The whole result as a JSON-serialisable dict."""
    cells = {key: aggregate(samples) for key, samples in outcome.samples.items()}
    order = {t: i for i, t in enumerate(ALL_TARGETS)}
    results = [
        {"target": t, "mode": m, "conns": c, **cells[(t, m, c)]}
        for (t, m, c) in sorted(cells, key=lambda k: (MODES.index(k[1]), k[2], order[k[0]]))
    ]
    ratios = compute_ratios(cells, cfg)
    checks = compute_checks(cells, cfg, outcome.soak)
    return {
        "schema": 1,
        "meta": outcome.meta,
        "config": {
            "connections": cfg.connections,
            "duration_s": cfg.duration_s,
            "warmup_s": cfg.warmup_s,
            "modes": cfg.modes,
            "repeat": cfg.repeat,
            "soak_s": cfg.soak_s,
            "soak_conns": cfg.soak_conns,
            "soak_mode": cfg.soak_mode,
            "quick": cfg.quick,
        },
        "skipped": outcome.skipped,
        "results": results,
        "ratios": ratios,
        "targets": [c.to_dict() for c in checks],
        "targets_failed": sum(c.status == "FAIL" for c in checks),
        "soak": outcome.soak,
        "error": outcome.error,
    }


def compute_ratios(cells: dict[tuple[str, str, int], dict[str, Any]], cfg: Config) -> list[dict]:
    """Throughput and CPU ratios per (mode, conns); added-latency ratios at 1 connection."""
    out: list[dict[str, Any]] = []
    pairs = (("passthrough", "mock"), ("veil", "passthrough"), ("veil", "mock"))
    for mode in cfg.modes:
        for conns in cfg.connections:
            for target, base in pairs:
                a, b = cells.get((target, mode, conns)), cells.get((base, mode, conns))
                if not a or not b:
                    continue
                out.append(
                    {
                        "kind": "throughput_cpu",
                        "target": target,
                        "baseline": base,
                        "mode": mode,
                        "conns": conns,
                        "throughput_ratio": _round(_ratio(a["rps"], b["rps"]), 3),
                        "cpu_ratio": _round(_ratio(a["cpu_ms_per_req"], b["cpu_ms_per_req"]), 3),
                    }
                )
        out.extend(_added_latency(cells, mode))
    return out


def _added_latency(cells: dict[tuple[str, str, int], dict[str, Any]], mode: str) -> list[dict]:
    mock = cells.get(("mock", mode, 1))
    if not mock:
        return []
    row: dict[str, Any] = {"kind": "added_latency", "mode": mode, "conns": 1}
    for pct in ("p50", "p99"):
        row[f"mock_{pct}_ms"] = mock[f"{pct}_ms"]
        for target in ("passthrough", "veil"):
            cell = cells.get((target, mode, 1))
            added = None if not cell else cell[f"{pct}_ms"] - mock[f"{pct}_ms"]
            row[f"{target}_added_{pct}_ms"] = _round(added, 3)
        row[f"ratio_{pct}"] = _round(
            _ratio(row[f"veil_added_{pct}_ms"], row[f"passthrough_added_{pct}_ms"]), 3
        )
    return [row]


def compute_checks(
    cells: dict[tuple[str, str, int], dict[str, Any]],
    cfg: Config,
    soak: dict[str, Any] | None,
) -> list[Check]:
    """The PASS/FAIL targets; empty when veil was not measured."""
    checks: list[Check] = []
    if not any(k[0] == "veil" for k in cells):
        return checks
    for mode in cfg.modes:
        for conns in cfg.connections:
            veil, pt = cells.get(("veil", mode, conns)), cells.get(("passthrough", mode, conns))
            if not veil or not pt:
                continue
            if conns > 1:
                checks.append(
                    Check(
                        f"CPU/req veil vs passthrough, {mode}, c={conns}",
                        _ratio(veil["cpu_ms_per_req"], pt["cpu_ms_per_req"]),
                        CPU_LIMIT,
                        higher_is_better=False,
                    )
                )
            checks.append(
                Check(
                    f"throughput veil vs passthrough, {mode}, c={conns}",
                    _ratio(veil["rps"], pt["rps"]),
                    THROUGHPUT_LIMIT,
                    higher_is_better=True,
                )
            )
        for row in _added_latency(cells, mode):
            for pct in ("p50", "p99"):
                pt_added = row[f"passthrough_added_{pct}_ms"]
                veil_added = row[f"veil_added_{pct}_ms"]
                if pt_added is None or veil_added is None:
                    detail = "not measured at 1 connection"
                elif pt_added <= 0:
                    detail = "passthrough added no latency over the mock: ratio undefined"
                else:
                    detail = f"veil {veil_added:+.3f} ms, passthrough {pt_added:+.3f} ms"
                checks.append(
                    Check(
                        f"added {pct} latency veil vs passthrough, {mode}, c=1",
                        row[f"ratio_{pct}"],
                        LATENCY_LIMIT,
                        higher_is_better=False,
                        detail=detail,
                    )
                )
    if soak is not None and "requests" in soak:
        errors, requests = soak["errors"], soak["requests"]
        checks.append(
            Check(
                f"soak veil c={soak['conns']} {soak['duration_s']}s {soak['mode']}: errors",
                float(errors) if requests else None,
                0,
                higher_is_better=False,
                detail=f"{requests} requests, {errors} errors",
            )
        )
    return checks


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_text(doc: dict[str, Any]) -> str:
    """The human-readable report: results table, ratios, targets, soak."""
    lines: list[str] = []
    meta = doc["meta"]
    lines.append(
        f"veil benchmark — load generator: {meta.get('loadgen', '?')}; mock: "
        f"{meta.get('mock', '?')}; pinning: {meta.get('pin', {}).get('mode', '?')}; "
        f"{doc['config']['duration_s']}s per measurement, repeat {doc['config']['repeat']}"
    )
    for skip in doc["skipped"]:
        lines.append(f"SKIPPED {skip['target']}: {skip['reason']}")
    lines.append("")
    header = (
        f"{'target':<12}{'mode':<10}{'conns':>6}{'rps':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'CPU ms/req':>12}{'host busy%':>12}"
    )
    lines += [header, "-" * len(header)]
    for r in doc["results"]:
        lines.append(
            f"{r['target']:<12}{r['mode']:<10}{r['conns']:>6}{_fmt(r['rps'], 0):>10}"
            f"{_fmt(r['p50_ms'], 2):>9}{_fmt(r['p99_ms'], 2):>9}{r['errors']:>8}"
            f"{_fmt(r['cpu_ms_per_req'], 3):>12}{_fmt(r['host_busy_pct'], 0):>12}"
        )
    tc = [r for r in doc["ratios"] if r["kind"] == "throughput_cpu"]
    if tc:
        lines += ["", "Ratios (throughput: higher is better; CPU per request: lower is better)"]
        lines.append(f"{'target / baseline':<26}{'mode':<10}{'conns':>6}{'rps x':>9}{'CPU x':>9}")
        for r in tc:
            lines.append(
                f"{r['target'] + ' / ' + r['baseline']:<26}{r['mode']:<10}{r['conns']:>6}"
                f"{_fmt(r['throughput_ratio'], 2):>9}{_fmt(r['cpu_ratio'], 2):>9}"
            )
    for r in (r for r in doc["ratios"] if r["kind"] == "added_latency"):
        lines.append("")
        lines.append(f"Added latency over the mock at 1 connection, {r['mode']} (ms):")
        for pct in ("p50", "p99"):
            text = f"  {pct}: mock {_fmt(r[f'mock_{pct}_ms'], 3)}"
            for target in ("passthrough", "veil"):
                added = r[f"{target}_added_{pct}_ms"]
                if added is not None:
                    text += f", {target} {added:+.3f}"
            if r[f"ratio_{pct}"] is not None:
                text += f", veil/passthrough {r[f'ratio_{pct}']:.2f}"
            lines.append(text)
    soak = doc.get("soak")
    if soak:
        lines.append("")
        if "requests" in soak:
            lines.append(
                f"Soak: veil {soak['mode']} c={soak['conns']} {soak['duration_s']}s: "
                f"{soak['requests']} requests, {soak['rps']:.0f} rps, p99 {soak['p99_ms']:.1f} ms, "
                f"{soak['errors']} errors (non-2xx {soak['non2xx']}, connect "
                f"{soak['connect_errors']}, read {soak['read_errors']}, write "
                f"{soak['write_errors']}, timeout {soak['timeouts']})"
            )
        else:
            lines.append(f"Soak: skipped ({soak.get('skipped')})")
    lines.append("")
    if doc["targets"]:
        lines.append("Targets")
        for t in doc["targets"]:
            value = _fmt(t["value"], 2)
            extra = f"  ({t['detail']})" if t["detail"] else ""
            lines.append(
                f"  {t['status']:<5} {t['name']:<58} {value:>7} {t['op']} {t['limit']}{extra}"
            )
        counts = {k: sum(t["status"] == k for t in doc["targets"]) for k in ("PASS", "FAIL", "N/A")}
        lines.append(
            f"  {counts['PASS']} passed, {counts['FAIL']} failed, {counts['N/A']} not applicable"
        )
    else:
        lines.append("Targets: not evaluated (veil was not measured).")
    if doc.get("error"):
        lines += ["", f"ERROR: {doc['error']}"]
    return "\n".join(lines)
