"""Reading routing rows: JSONL of ``{prompt, scores: {model: 0..1}}``.

Optional per-row keys: ``tokens`` ({model: answer length in tokens}),
``cost_usd`` ({model: dollars}), ``benchmark`` and ``id``. Rows may score only
some of the models (logged outcomes of a live pool usually do).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

Row = dict[str, Any]


def _fail(where: str, what: str) -> DataError:
    return DataError(
        f"{where}: {what}. Each line must be a JSON object like "
        '{"prompt": "...", "scores": {"model-a": 1.0, "model-b": 0.0}} '
        "(optional: tokens, cost_usd, benchmark, id)."
    )


def check_row(row: Any, where: str) -> Row:
    """Validate one row and return it; raise :class:`DataError` naming ``where``."""
    if not isinstance(row, dict):
        raise _fail(where, "not a JSON object")
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise _fail(where, 'missing "prompt" (a string)')
    scores = row.get("scores")
    if not isinstance(scores, dict) or not scores:
        raise _fail(where, 'missing "scores" (an object of model name to 0..1)')
    for model, value in scores.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0.0 <= value <= 1.0
        ):
            raise _fail(where, f"score of {model!r} is {value!r}, not a number in 0..1")
    for key in ("tokens", "cost_usd"):
        extra = row.get(key)
        if extra is None:
            continue
        if not isinstance(extra, dict) or any(
            isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0
            for v in extra.values()
        ):
            raise _fail(where, f'"{key}" must map model names to non-negative numbers')
    return row


def read_jsonl(path: str | Path) -> Iterator[Row]:
    """Yield the validated rows of one JSONL file (blank lines skipped)."""
    p = Path(path)
    try:
        f = p.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise _fail(f"{p}:{n}", "not valid JSON") from None
            yield check_row(row, f"{p}:{n}")


def read_many(paths: Iterable[str | Path]) -> list[Row]:
    """All rows of several JSONL files, in order."""
    rows: list[Row] = []
    for path in paths:
        rows.extend(read_jsonl(path))
    return rows


def model_names(rows: Iterable[Row]) -> list[str]:
    """Models scored anywhere in ``rows``, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        for m in row["scores"]:
            seen.setdefault(m, None)
    return list(seen)
