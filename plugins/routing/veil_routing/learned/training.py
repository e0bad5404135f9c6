"""Training a :class:`QualityRouter` from scored rows (scikit-learn, CPU).

Per model: logistic regression on the prompt's TF-IDF-weighted hashed word
features, with the row's score as a soft label (a row scored 0.7 counts as 0.7
of a correct and 0.3 of a wrong answer), trained only on the rows that score
that model. Per model with ``tokens`` data: ridge regression of
``log1p(tokens)``. Then k-means over the training rows' predicted-quality
vectors gives the prompt clusters used by online feedback.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from ._features import hashed_counts
from .data import Row, check_row, model_names
from .errors import DataError
from .router import DEFAULT_OUTPUT_TOKENS, QualityRouter

Progress = Callable[[str, float], None]
"""Called with a short label of the current step and the overall fraction done (0..1)."""

DEFAULTS: dict[str, Any] = {
    "C": 0.5,  # inverse L2 strength of the quality models (chosen by grouped CV, see docs)
    "n_bits": 16,  # 2**16 hash buckets (18 measured no better, twice the size)
    "min_df": 5,  # a bucket must occur in this many prompts to get a weight
    "n_clusters": 8,
    "ridge_alpha": 1.0,
    "seed": 0,
}
MIN_LENGTH_ROWS = 10


def _no_progress(label: str, fraction: float) -> None:
    return None


def _design(
    counts: list[dict[int, int]], min_df: int
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float32], Any]:
    from scipy.sparse import csr_matrix  # type: ignore[import-untyped]

    df: Counter[int] = Counter()
    for c in counts:
        df.update(c.keys())
    kept = sorted(k for k, n in df.items() if n >= min_df) or sorted(df)
    ids = np.asarray(kept, dtype=np.uint32)
    n = len(counts)
    idf = np.asarray([math.log((1 + n) / (1 + df[k])) + 1.0 for k in kept], dtype=np.float32)
    index = {k: i for i, k in enumerate(kept)}
    indptr, cols, vals = [0], [], []
    for c in counts:
        row_cols = [index[k] for k in c if k in index]
        row_vals = np.asarray(
            [(1.0 + math.log(c[k])) * idf[index[k]] for k in c if k in index], dtype=np.float64
        )
        norm = float(np.sqrt(row_vals @ row_vals)) if len(row_vals) else 0.0
        if norm > 0:
            row_vals /= norm
        cols.extend(row_cols)
        vals.extend(row_vals.tolist())
        indptr.append(len(cols))
    x = csr_matrix(
        (np.asarray(vals, dtype=np.float64), np.asarray(cols), np.asarray(indptr)),
        shape=(n, len(kept)),
    )
    return ids, idf, x


def _fit_quality(
    x: Any, y: npt.NDArray[np.float64], c_value: float
) -> tuple[npt.NDArray[np.float64], float]:
    from scipy.sparse import vstack
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    mean = float(y.mean())
    if y.min() == y.max():
        p = min(max(mean, 0.02), 0.98)
        return np.zeros(x.shape[1]), math.log(p / (1 - p))
    hard = (y == 0) | (y == 1)
    xs, ys, ws = [x[hard]], [y[hard]], [np.ones(int(hard.sum()))]
    soft = ~hard
    if soft.any():
        xs += [x[soft], x[soft]]
        ys += [np.ones(int(soft.sum())), np.zeros(int(soft.sum()))]
        ws += [y[soft], 1 - y[soft]]
    clf = LogisticRegression(C=c_value, max_iter=2000)
    clf.fit(vstack(xs).tocsr(), np.concatenate(ys).astype(int), sample_weight=np.concatenate(ws))
    return clf.coef_[0], float(clf.intercept_[0])


def train(
    rows: Iterable[Row], *, progress: Progress | None = None, **options: Any
) -> QualityRouter:
    """Train a router on rows of ``{prompt, scores: {model: 0..1}[, tokens]}``.

    ``options`` override :data:`DEFAULTS` (``C``, ``n_bits``, ``min_df``,
    ``n_clusters``, ``ridge_alpha``, ``seed``); an unknown option raises
    ``TypeError``. Raises :class:`DataError` for unusable rows. Deterministic:
    the same rows and options give the same artifact bytes.
    """
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    opt = {**DEFAULTS, **options}
    report = progress or _no_progress
    data = [check_row(r, f"row {i + 1}") for i, r in enumerate(rows)]
    if len(data) < 2:
        raise DataError(f"{len(data)} usable row(s): training needs at least 2 scored prompts")
    models = model_names(data)
    n_bits = int(opt["n_bits"])

    counts: list[dict[int, int]] = []
    step = max(1, len(data) // 50)
    for i, r in enumerate(data):
        counts.append(hashed_counts(r["prompt"], n_bits))
        if i % step == 0:
            report("features", 0.2 * i / len(data))
    ids, idf, x = _design(counts, int(opt["min_df"]))
    report("features", 0.2)

    coef = np.zeros((len(ids), len(models)), dtype=np.float32)
    intercept = np.zeros(len(models), dtype=np.float32)
    for j, m in enumerate(models):
        have = np.asarray([m in r["scores"] for r in data])
        y = np.asarray([float(r["scores"][m]) for r in data if m in r["scores"]])
        w, b = _fit_quality(x[have], y, float(opt["C"]))
        coef[:, j], intercept[j] = w, b
        report(f"quality {m}", 0.2 + 0.6 * (j + 1) / len(models))

    length_models, length_cols, length_b, seen_tokens = _fit_lengths(
        data, models, x, float(opt["ridge_alpha"])
    )
    report("answer lengths", 0.9)

    logits = np.asarray(x @ coef) + intercept
    probs = 1.0 / (1.0 + np.exp(-logits))
    centers = _clusters(probs, int(opt["n_clusters"]), int(opt["seed"]))
    report("clusters", 1.0)

    benchmarks = Counter(str(r.get("benchmark", "")) for r in data if r.get("benchmark"))
    return QualityRouter(
        models=models,
        n_bits=n_bits,
        feature_ids=ids,
        idf=idf,
        coef=coef,
        intercept=intercept,
        length_models=length_models,
        length_coef=(
            np.stack(length_cols, axis=1)
            if length_cols
            else np.zeros((len(ids), 0), dtype=np.float32)
        ),
        length_intercept=np.asarray(length_b, dtype=np.float32),
        default_tokens=int(np.median(seen_tokens)) if seen_tokens else DEFAULT_OUTPUT_TOKENS,
        centers=centers,
        meta={
            "trained_rows": len(data),
            "benchmarks": dict(sorted(benchmarks.items())),
            "options": opt,
            "model_family": "hashed word TF-IDF + logistic regression per model",
        },
    )


def _fit_lengths(
    data: list[Row], models: list[str], x: Any, alpha: float
) -> tuple[list[str], list[npt.NDArray[np.float32]], list[float], list[float]]:
    from sklearn.linear_model import Ridge

    names: list[str] = []
    cols: list[npt.NDArray[np.float32]] = []
    intercepts: list[float] = []
    seen: list[float] = []
    for m in models:
        idx = [
            i for i, r in enumerate(data) if isinstance(r.get("tokens"), dict) and m in r["tokens"]
        ]
        if len(idx) < MIN_LENGTH_ROWS:
            continue
        y = np.log1p(np.asarray([float(data[i]["tokens"][m]) for i in idx]))
        seen.extend(float(data[i]["tokens"][m]) for i in idx)
        reg = Ridge(alpha=alpha).fit(x[idx], y)
        names.append(m)
        cols.append(np.asarray(reg.coef_, dtype=np.float32))
        intercepts.append(float(reg.intercept_))
    return names, cols, intercepts, seen


def _clusters(probs: npt.NDArray[np.float64], k: int, seed: int) -> npt.NDArray[np.float32]:
    from sklearn.cluster import KMeans  # type: ignore[import-untyped]

    distinct = len(np.unique(np.round(probs, 6), axis=0))
    k = max(1, min(k, distinct))
    if k == 1:
        return np.asarray(probs.mean(axis=0, keepdims=True), dtype=np.float32)
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(probs)
    centers: npt.NDArray[np.float64] = np.asarray(km.cluster_centers_, dtype=np.float64)
    order = np.lexsort(centers.T[::-1])  # stable ids: sorted centres
    return np.asarray(centers[order], dtype=np.float32)
