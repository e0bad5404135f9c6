"""Routing metrics on scored rows: RouteLLM's for two models, cost-to-quality for pools.

Two-model data (every row scores the same two models): the *strong* model is
the one with the higher mean score. A router ranks prompts by predicted
``quality(strong) - quality(weak)``; sending the top share ``c`` of prompts to
the strong model gives quality ``q(c)``. PGR(c) = (q(c) - q_weak) / (q_strong -
q_weak); **APGR** is the area under PGR over c in [0, 1] (exact step curve over
every prompt, trapezoid rule); **CPT(x)** is the smallest share of strong calls
with PGR >= x; **saving_at_95** is 1 - the smallest strong-call share whose
quality reaches 95% of the strong model's. Random routing: APGR 0.5, CPT(x) = x.

Multi-model data: a router picks, per prompt, ``argmax_m predicted(m) - lam *
cost(m)`` (cost(m): the model's mean dollar cost per query on the rows), for a
sweep of ``lam``; **cost_at_95** / **cost_at_100** are the lowest mean cost per
query among those operating points whose mean quality reaches 95% / 100% of the
best single model's (no interpolation between points; ``None`` if never).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .learned.data import Row
from .learned.errors import DataError

__all__ = [
    "CHARS_PER_TOKEN",
    "Matrix",
    "Predictor",
    "apgr",
    "cheapest_reaching",
    "common_models",
    "cost_matrix",
    "cpt",
    "cross_predict",
    "folds_of",
    "load_prices",
    "multi_metrics",
    "operating_points",
    "pair_metrics",
    "pgr_curve",
    "report",
    "strong_share_for_quality",
    "topic_of",
]

Matrix = npt.NDArray[np.float64]
Predictor = Callable[[list[str]], Matrix]
"""Maps prompts to predicted quality, shape (len(prompts), len(models))."""

CHARS_PER_TOKEN = 4.0


# ---------------------------------------------------------------- two models
def pgr_curve(score: npt.ArrayLike, strong: npt.ArrayLike, weak: npt.ArrayLike) -> Matrix:
    """PGR after sending the k highest-scored prompts to the strong model, k = 0..n."""
    sc, s, w = (np.asarray(a, dtype=np.float64) for a in (score, strong, weak))
    order = np.argsort(-sc, kind="stable")
    gain = np.concatenate([[0.0], np.cumsum((s - w)[order])]) / len(s)
    total = s.mean() - w.mean()
    if total <= 0:
        raise DataError(
            "the 'strong' model does not score higher than the weak one on these rows: "
            "APGR is undefined; evaluate on rows where one model is better on average"
        )
    return gain / total  # type: ignore[no-any-return]


def apgr(score: npt.ArrayLike, strong: npt.ArrayLike, weak: npt.ArrayLike) -> float:
    """Average performance gap recovered over all strong-call shares (0..1 typically)."""
    p = pgr_curve(score, strong, weak)
    return float(((p[1:] + p[:-1]) / 2).mean())


def cpt(score: npt.ArrayLike, strong: npt.ArrayLike, weak: npt.ArrayLike, x: float) -> float:
    """Smallest share of calls to the strong model whose PGR reaches ``x``."""
    p = pgr_curve(score, strong, weak)
    hit = np.nonzero(p >= x - 1e-12)[0]
    return float(hit[0] / (len(p) - 1)) if len(hit) else 1.0


def strong_share_for_quality(
    score: npt.ArrayLike, strong: npt.ArrayLike, weak: npt.ArrayLike, fraction: float
) -> float | None:
    """Smallest strong-call share whose quality reaches ``fraction`` of the strong model's."""
    sc, s, w = (np.asarray(a, dtype=np.float64) for a in (score, strong, weak))
    order = np.argsort(-sc, kind="stable")
    q = w.mean() + np.concatenate([[0.0], np.cumsum((s - w)[order])]) / len(s)
    hit = np.nonzero(q >= fraction * s.mean() - 1e-12)[0]
    return float(hit[0] / len(s)) if len(hit) else None


def pair_metrics(
    score: npt.ArrayLike, strong: npt.ArrayLike, weak: npt.ArrayLike
) -> dict[str, Any]:
    """APGR, CPT(50%), CPT(80%) and the strong-call saving at 95% of strong quality."""
    share95 = strong_share_for_quality(score, strong, weak, 0.95)
    return {
        "apgr": round(apgr(score, strong, weak), 4),
        "cpt50": round(cpt(score, strong, weak, 0.5), 4),
        "cpt80": round(cpt(score, strong, weak, 0.8), 4),
        "saving_at_95": None if share95 is None else round(1 - share95, 4),
    }


# ---------------------------------------------------------------- many models
def operating_points(pred: Matrix, quality: Matrix, cost: Matrix) -> list[tuple[float, float]]:
    """(mean cost, mean quality) of ``argmax pred - lam * mean_cost`` over a sweep of lam."""
    unit = cost.mean(axis=0)
    scale = float(unit.max()) or 1.0
    rows = np.arange(len(pred))
    points = []
    for lam in np.concatenate([[0.0], np.geomspace(1e-4, 1e4, 400)]):
        choice = np.argmax(pred - lam * unit[None, :] / scale, axis=1)
        points.append((float(cost[rows, choice].mean()), float(quality[rows, choice].mean())))
    return points


def cheapest_reaching(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Lowest cost among points whose quality reaches ``target`` (None if none does)."""
    costs = [c for c, q in points if q >= target - 1e-12]
    return min(costs) if costs else None


def multi_metrics(pred: Matrix, quality: Matrix, cost: Matrix) -> dict[str, Any]:
    """Cost per query to reach 95% and 100% of the best single model's quality."""
    best = int(np.argmax(quality.mean(axis=0)))
    q_best, c_best = float(quality[:, best].mean()), float(cost[:, best].mean())
    points = operating_points(pred, quality, cost)
    out: dict[str, Any] = {}
    for name, frac in (("cost_at_95", 0.95), ("cost_at_100", 1.0)):
        c = cheapest_reaching(points, frac * q_best)
        out[name] = None if c is None else round(c, 8)
        out[name.replace("cost", "cost_ratio")] = None if c is None else round(c / c_best, 4)
    return out


# ---------------------------------------------------------------- data plumbing
def common_models(rows: Sequence[Row]) -> list[str]:
    """Models every row scores, in the first row's order."""
    if not rows:
        raise DataError("no rows to evaluate: pass a JSONL file with scored prompts")
    shared = set(rows[0]["scores"])
    for r in rows[1:]:
        shared &= set(r["scores"])
    models = [m for m in rows[0]["scores"] if m in shared]
    if len(models) < 2:
        raise DataError(
            f"evaluation needs at least two models scored on every row; only {models or 'none'} are"
        )
    return models


def load_prices(path: str | Path) -> dict[str, tuple[float, float]]:
    """$ per 1M input and output tokens per model from a prices JSON
    (``{"models": {name: {"input_per_1m": x, "output_per_1m": y}}}``)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return {
            m: (float(v["input_per_1m"]), float(v["output_per_1m"]))
            for m, v in raw["models"].items()
        }
    except OSError as e:
        raise DataError(f"cannot read prices {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DataError(
            f"{path} is not a prices file: expected "
            '{"models": {"name": {"input_per_1m": 10.0, "output_per_1m": 30.0}}}'
        ) from None


def cost_matrix(
    rows: Sequence[Row], models: list[str], prices: dict[str, tuple[float, float]] | None
) -> Matrix | None:
    """Dollar cost per row and model: the row's ``cost_usd`` where it has one,
    else prices x (prompt chars / 4 input tokens + the row's ``tokens`` output,
    1 when absent). None when neither is available for some model."""
    out = np.zeros((len(rows), len(models)))
    for i, r in enumerate(rows):
        recorded = r.get("cost_usd") or {}
        tokens = r.get("tokens") or {}
        for j, m in enumerate(models):
            if m in recorded:
                out[i, j] = float(recorded[m])
            elif prices is not None and m in prices:
                p_in, p_out = prices[m]
                n_in = len(r["prompt"]) / CHARS_PER_TOKEN
                out[i, j] = (p_in * n_in + p_out * float(tokens.get(m, 1))) / 1e6
            else:
                return None
    return out


def topic_of(row: Row) -> str:
    """A row's topic for grouped splits: benchmark plus MMLU subject when the id
    has one (``mmlu/<subject>/<n>``), else the benchmark plus a hash bucket."""
    rid = str(row.get("id", ""))
    bench = str(row.get("benchmark", ""))
    parts = rid.split("/")
    if len(parts) >= 3:
        return "/".join(parts[:2])
    h = int(hashlib.sha256(rid.encode() or row["prompt"].encode()).hexdigest()[:8], 16)
    return f"{bench}/{h % 20}"


def folds_of(rows: Sequence[Row], k: int, group: str, seed: int = 0) -> npt.NDArray[np.int64]:
    """Fold number (0..k-1) per row: by question (hash of the prompt) or by topic."""
    if group == "question":
        keys = [r["prompt"] for r in rows]
    elif group == "topic":
        keys = [topic_of(r) for r in rows]
    else:
        raise ValueError(f"unknown grouping {group!r}: use 'question' or 'topic'")
    distinct = sorted(set(keys))
    rng = np.random.RandomState(seed)
    rng.shuffle(distinct)
    fold = {key: i % k for i, key in enumerate(distinct)}
    return np.asarray([fold[key] for key in keys])


def cross_predict(
    rows: Sequence[Row],
    models: list[str],
    *,
    k: int = 5,
    group: str = "question",
    progress: Callable[[float], None] | None = None,
    **options: Any,
) -> Matrix:
    """Out-of-fold predicted quality: train on k-1 folds, predict the held-out one."""
    from .learned import train

    folds = folds_of(rows, k, group)
    pred = np.zeros((len(rows), len(models)))
    for f in range(k):
        held = np.nonzero(folds == f)[0]
        if not len(held):
            continue
        part = [rows[int(i)] for i in np.nonzero(folds != f)[0]]

        def step(_label: str, frac: float, f: int = f) -> None:
            if progress:
                progress((f + frac) / k)

        router = train(part, progress=step, **options)
        missing = [m for m in models if m not in router.models]
        if missing:
            raise DataError(f"fold {f}: no training row scores {missing}; use fewer folds")
        cols = [router.models.index(m) for m in models]
        pred[held] = router.predict_many([rows[int(i)]["prompt"] for i in held])[:, cols]
    return pred


# ---------------------------------------------------------------- the report
def report(
    rows: Sequence[Row],
    pred: Matrix,
    models: list[str],
    prices: dict[str, tuple[float, float]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of ``pred`` (rows x models) next to the baselines; a JSON-able dict."""
    quality = np.asarray([[float(r["scores"][m]) for m in models] for r in rows])
    cost = cost_matrix(rows, models, prices)
    benches = Counter(str(r.get("benchmark", "")) for r in rows)
    out: dict[str, Any] = {"rows": len(rows), "models": models, "benchmarks": dict(benches)}
    if len(models) == 2:
        return out | _pair_report(rows, pred, quality, cost, models)
    if cost is None:
        raise DataError(
            "multi-model evaluation needs costs: rows with cost_usd, or --prices FILE "
            "with every model's input_per_1m and output_per_1m"
        )
    return out | _multi_report(pred, quality, cost, models, seed)


def _pair_report(
    rows: Sequence[Row], pred: Matrix, quality: Matrix, cost: Matrix | None, models: list[str]
) -> dict[str, Any]:
    si = int(np.argmax(quality.mean(axis=0)))
    wi = 1 - si
    s, w = quality[:, si], quality[:, wi]
    score = pred[:, si] - pred[:, wi]
    out: dict[str, Any] = {"kind": "two-model", "strong": models[si], "weak": models[wi]}
    out |= pair_metrics(score, s, w)
    out["baselines"] = {
        "random": {
            "apgr": 0.5,
            "cpt50": 0.5,
            "cpt80": 0.8,
            "saving_at_95": round(
                1 - max(0.0, (0.95 * s.mean() - w.mean()) / (s.mean() - w.mean())), 4
            ),
        },
        "oracle": pair_metrics(s - w, s, w),
        "always_strong": {"quality": round(float(s.mean()), 4), "strong_share": 1.0},
        "always_weak": {"quality": round(float(w.mean()), 4), "strong_share": 0.0},
    }
    if cost is not None:
        share = strong_share_for_quality(score, s, w, 0.95)
        if share is not None:
            order = np.argsort(-score, kind="stable")
            n = int(round(share * len(s)))
            chosen = np.full(len(s), wi)
            chosen[order[:n]] = si
            spent = float(cost[np.arange(len(s)), chosen].mean())
            out["cost_saving_at_95"] = round(1 - spent / float(cost[:, si].mean()), 4)
    by: dict[str, Any] = {}
    benches = np.asarray([str(r.get("benchmark", "")) for r in rows])
    for b in sorted(set(benches)):
        m = benches == b
        if b and m.sum() >= 20 and s[m].mean() > w[m].mean():
            by[b] = pair_metrics(score[m], s[m], w[m]) | {
                "rows": int(m.sum()),
                "oracle_cpt50": round(cpt(s[m] - w[m], s[m], w[m], 0.5), 4),
            }
    if len(by) > 1:
        out["by_benchmark"] = by
    return out


def _multi_report(
    pred: Matrix, quality: Matrix, cost: Matrix, models: list[str], seed: int
) -> dict[str, Any]:
    q_mean, c_mean = quality.mean(axis=0), cost.mean(axis=0)
    best = int(np.argmax(q_mean))
    cheap = int(np.argmin(c_mean))
    rng = np.random.RandomState(seed)
    pick = rng.randint(0, len(models), size=len(quality))
    idx = np.arange(len(quality))
    oracle = quality + 1e-9 * rng.rand(*quality.shape)
    out: dict[str, Any] = {"kind": "multi-model", "best_model": models[best]}
    out |= multi_metrics(pred, quality, cost)
    out["best_model_cost"] = round(float(c_mean[best]), 8)
    out["best_model_quality"] = round(float(q_mean[best]), 4)
    out["baselines"] = {
        "always_best": {
            "quality": round(float(q_mean[best]), 4),
            "cost": round(float(c_mean[best]), 8),
        },
        "always_cheapest": {
            "model": models[cheap],
            "quality": round(float(q_mean[cheap]), 4),
            "cost": round(float(c_mean[cheap]), 8),
        },
        "random": {
            "quality": round(float(quality[idx, pick].mean()), 4),
            "cost": round(float(cost[idx, pick].mean()), 8),
        },
        "oracle": multi_metrics(oracle, quality, cost),
    }
    return out
