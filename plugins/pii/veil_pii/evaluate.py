"""Detection quality on labelled text: leak rate, precision, recall, F1.

The input is JSONL, one record a line: ``{"text": ..., "spans": [{"start",
"end", "type"}]}`` with Python ``str`` offsets, end-exclusive (the format of
presidio-research's synthetic data). Figures:

- *leak rate*: the share of labelled spans of which at least one
  non-space character would reach the model in clear, i.e. is not covered
  by a finding whose type the policy redacts, masks or blocks. The overall
  figure counts the labelled types the policy protects (``in_policy``);
  ``leak_rate_all_types`` counts every labelled span.
- *precision/recall, any type*: a finding counts as correct if it overlaps
  any labelled span; a labelled span counts as found if any finding
  overlaps it.
- *precision/recall, same type*: the overlap must also have the same type.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .detector import Finding

__all__ = ["Record", "Tally", "evaluate", "read_records"]


@dataclass(frozen=True, slots=True)
class Record:
    """One labelled text."""

    text: str
    spans: tuple[tuple[int, int, str], ...]


def read_records(path: Path) -> Iterator[Record]:
    """Records of a JSONL file.

    :raises ValueError: a line is not JSON or lacks ``text``/``spans``; the
        message names the line.
    """
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                spans = tuple(
                    (int(s["start"]), int(s["end"]), str(s["type"])) for s in row["spans"]
                )
                yield Record(str(row["text"]), spans)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a labelled record ({e})") from e


@dataclass
class _TypeCount:
    n: int = 0
    leaked: int = 0
    found_same: int = 0
    found_any: int = 0
    predicted: int = 0
    predicted_correct: int = 0


@dataclass
class Tally:
    """Counts accumulated over records; :meth:`report` turns them into figures."""

    protected: frozenset[str]
    types: dict[str, _TypeCount] = field(default_factory=dict)
    predicted: int = 0
    predicted_any: int = 0
    predicted_same: int = 0
    records: int = 0

    def add(self, record: Record, findings: Iterable[Finding]) -> None:
        """Count one record against what the detector found in it."""
        self.records += 1
        findings = list(findings)
        covered = bytearray(len(record.text))
        for f in findings:
            if f.entity_type in self.protected:
                covered[f.start : f.end] = b"\x01" * (f.end - f.start)
        for start, end, label in record.spans:
            count = self.types.setdefault(label, _TypeCount())
            count.n += 1
            text = record.text
            if any(
                not text[i].isspace() and not covered[i] for i in range(start, min(end, len(text)))
            ):
                count.leaked += 1
            overlapping = [f for f in findings if f.start < end and start < f.end]
            count.found_any += bool(overlapping)
            count.found_same += any(f.entity_type == label for f in overlapping)
        for f in findings:
            self.predicted += 1
            labels = [lab for s, e, lab in record.spans if f.start < e and s < f.end]
            self.predicted_any += bool(labels)
            self.predicted_same += f.entity_type in labels
            count = self.types.setdefault(f.entity_type, _TypeCount())
            count.predicted += 1
            count.predicted_correct += f.entity_type in labels

    def report(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict (see the module doc)."""
        in_policy = {t: c for t, c in self.types.items() if t in self.protected and c.n}
        labelled = [c for c in self.types.values() if c.n]
        n_in = sum(c.n for c in in_policy.values())
        n_all = sum(c.n for c in labelled)
        recall_any = _ratio(sum(c.found_any for c in labelled), n_all)
        recall_same = _ratio(sum(c.found_same for c in labelled), n_all)
        precision_any = _ratio(self.predicted_any, self.predicted)
        precision_same = _ratio(self.predicted_same, self.predicted)
        return {
            "records": self.records,
            "spans": n_all,
            "spans_in_policy": n_in,
            "findings": self.predicted,
            "leak_rate": _ratio(sum(c.leaked for c in in_policy.values()), n_in),
            "leak_rate_all_types": _ratio(sum(c.leaked for c in labelled), n_all),
            "precision_any": precision_any,
            "recall_any": recall_any,
            "f1_any": _f1(precision_any, recall_any),
            "precision_same_type": precision_same,
            "recall_same_type": recall_same,
            "f1_same_type": _f1(precision_same, recall_same),
            "per_type": {
                label: {
                    "n": c.n,
                    "in_policy": label in self.protected,
                    "leak_rate": _ratio(c.leaked, c.n),
                    "recall": _ratio(c.found_same, c.n),
                    "recall_any": _ratio(c.found_any, c.n),
                    "precision": _ratio(c.predicted_correct, c.predicted),
                    "f1": _f1(_ratio(c.predicted_correct, c.predicted), _ratio(c.found_same, c.n)),
                    "findings": c.predicted,
                }
                for label, c in sorted(self.types.items(), key=lambda kv: (-kv[1].n, kv[0]))
            },
        }


def evaluate(
    records: Iterable[Record],
    analyze: Callable[[str], list[Finding]],
    protected: frozenset[str],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``analyze`` on every record and return :meth:`Tally.report`."""
    tally = Tally(protected)
    for record in records:
        tally.add(record, analyze(record.text))
        if progress is not None:
            progress(1)
    return tally.report()


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _f1(p: float | None, r: float | None) -> float | None:
    if p is None or r is None or p + r == 0:
        return None
    return round(2 * p * r / (p + r), 4)


def format_report(report: Mapping[str, Any]) -> str:
    """A human-readable table of a report."""
    lines = [
        f"records {report['records']}, labelled spans {report['spans']} "
        f"({report['spans_in_policy']} of types the policy protects), "
        f"findings {report['findings']}",
        "",
        f"{'type':<20}{'n':>6}{'leak':>8}{'recall':>8}{'prec.':>8}{'f1':>8}  policy",
    ]
    for label, row in report["per_type"].items():
        if not row["n"]:
            continue
        lines.append(
            f"{label:<20}{row['n']:>6}{_pct(row['leak_rate']):>8}{_pct(row['recall']):>8}"
            f"{_pct(row['precision']):>8}{_pct(row['f1']):>8}  "
            + ("protected" if row["in_policy"] else "not detected/allowed")
        )
    lines += [
        "",
        f"leak rate (protected types) {_pct(report['leak_rate'])}   "
        f"(all labelled types {_pct(report['leak_rate_all_types'])})",
        f"overlap, any type:  precision {_pct(report['precision_any'])}  "
        f"recall {_pct(report['recall_any'])}  F1 {_pct(report['f1_any'])}",
        f"overlap, same type: precision {_pct(report['precision_same_type'])}  "
        f"recall {_pct(report['recall_same_type'])}  F1 {_pct(report['f1_same_type'])}",
    ]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"
