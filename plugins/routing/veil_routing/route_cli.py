"""``veil route train`` and ``veil route eval``: build and measure learned routers.

Exit codes: 0 success; 2 usage error (click); 3 unusable data (unreadable
file, bad row, too few rows); 4 router artifact refused (unreadable, damaged,
or its SHA-256 differs from ``--sha256``); 5 the router does not know a model
the data scores; 6 ``train`` without scikit-learn (``veil-routing[train]``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

__all__ = ["EXIT_ARTIFACT", "EXIT_DATA", "EXIT_MISMATCH", "EXIT_SETUP", "eval_", "route", "train"]

EXIT_DATA = 3
EXIT_ARTIFACT = 4
EXIT_MISMATCH = 5
EXIT_SETUP = 6
"""A package the command needs is not installed."""


def _fail(message: str, code: int, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message, "exit_code": code}))
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


class _Bar:
    """A click progress bar on stderr fed with fractions 0..1."""

    def __init__(self, label: str) -> None:
        self._cm = click.progressbar(length=1000, label=label, file=sys.stderr, show_eta=True)
        self._bar = self._cm.__enter__()
        self._done = 0

    def __call__(self, fraction: float) -> None:
        target = min(1000, int(fraction * 1000))
        if target > self._done:
            self._bar.update(target - self._done)
            self._done = target

    def close(self) -> None:
        self(1.0)
        self._cm.__exit__(None, None, None)


@click.group()
def route() -> None:
    """Learned routing: train a router on scored prompts, measure it.

    \b
    Data: JSONL, one prompt a line, as in the routing data sets:
      {"prompt": "...", "scores": {"model-a": 1.0, "model-b": 0.0},
       "tokens": {"model-a": 120}, "cost_usd": {"model-a": 0.002}}
    (tokens and cost_usd are optional). Train with `veil route train`, pin the
    printed sha256 in the policy's [routing.router] section, and check the
    router on rows it was not trained on with `veil route eval`.
    """


@route.command()
@click.option(
    "--data",
    "data_files",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A JSONL file of scored prompts; repeat for several.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the router artifact (e.g. routers/pool.veilrouter).",
)
@click.option("--c", "c_value", type=float, default=None, help="Inverse L2 strength (default 0.5).")
@click.option(
    "--clusters",
    type=click.IntRange(1, 256),
    default=None,
    help="Prompt clusters for feedback (default 8).",
)
@click.option(
    "--bits",
    type=click.IntRange(10, 24),
    default=None,
    help="log2 of the hash buckets (default 16); fewer make a smaller artifact.",
)
@click.option(
    "--min-df",
    type=click.IntRange(1, 1000),
    default=None,
    help="Keep features seen in at least this many prompts (default 5); more: smaller.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def train(
    data_files: tuple[Path, ...],
    out: Path,
    c_value: float | None,
    clusters: int | None,
    bits: int | None,
    min_df: int | None,
    as_json: bool,
) -> None:
    """Train a router artifact from scored prompts and print its sha256.

    \b
    Example:
      veil route train --data pairs.jsonl --out routers/pairs.veilrouter
    The sha256 goes into the policy ([routing.router] sha256 = "..."); a file
    whose sha256 differs is refused at load.
    """
    from .learned import DataError
    from .learned import train as train_router
    from .learned.data import read_many

    try:
        import sklearn  # type: ignore[import-untyped]  # noqa: F401 - training needs it
    except ImportError:
        _fail(
            "training needs scikit-learn, which routing itself does not: "
            "pip install 'veil-routing[train]'",
            EXIT_SETUP,
            as_json,
        )

    try:
        rows = read_many(data_files)
    except DataError as e:
        _fail(str(e), EXIT_DATA, as_json)
    options: dict[str, Any] = {}
    if c_value is not None:
        options["C"] = c_value
    if clusters is not None:
        options["n_clusters"] = clusters
    if bits is not None:
        options["n_bits"] = bits
    if min_df is not None:
        options["min_df"] = min_df
    bar = _Bar(f"training on {len(rows)} prompts")
    try:
        router = train_router(rows, progress=lambda _label, frac: bar(frac), **options)
    except DataError as e:
        bar.close()
        _fail(str(e), EXIT_DATA, as_json)
    bar.close()
    sha = router.save(out)
    result = {
        "ok": True,
        "artifact": str(out),
        "sha256": sha,
        "bytes": out.stat().st_size,
        "rows": len(rows),
        "models": router.models,
        "length_models": router.length_models,
        "clusters": router.n_clusters,
    }
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"wrote {out} ({result['bytes']:,} bytes, {len(rows)} prompts, {len(router.models)} models)"
    )
    click.echo(f"sha256 {sha}")
    click.echo('pin it in the policy: [routing.router] sha256 = "' + sha + '"')


@route.command(name="eval")
@click.option(
    "--data",
    "data_files",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL of scored prompts to evaluate on; repeat for several (pooled).",
)
@click.option(
    "--prices",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Prices JSON ($ per 1M input/output tokens) for rows without cost_usd.",
)
@click.option(
    "--router",
    "router_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A trained artifact. Without it: k-fold cross-validation "
    "(train on k-1 folds, score the rest).",
)
@click.option("--sha256", help="Refuse the --router artifact unless its sha256 is this.")
@click.option(
    "--folds",
    type=click.IntRange(2, 20),
    default=5,
    show_default=True,
    help="Folds without --router.",
)
@click.option(
    "--group",
    type=click.Choice(["question", "topic"]),
    default="question",
    show_default=True,
    help="Cross-validation grouping: unseen questions, or unseen topics "
    "(MMLU subject, benchmark bucket).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(
    data_files: tuple[Path, ...],
    prices: Path | None,
    router_path: Path | None,
    sha256: str | None,
    folds: int,
    group: str,
    as_json: bool,
) -> None:
    """Measure a router: RouteLLM's APGR/CPT for two models, cost to quality for pools.

    \b
    Two-model data (each row scores the same two models): apgr, cpt50, cpt80,
    saving_at_95 (strong calls saved at 95% of the strong model's quality),
    next to random and oracle routing, per benchmark too.
    Multi-model data: cost_at_95 / cost_at_100, the mean $ per query to reach
    95% / 100% of the best single model's quality (rows' cost_usd, or
    --prices), with best_model_cost, always-best, always-cheapest, random and
    oracle. Example:
      veil route eval --data held_out.jsonl --router routers/pool.veilrouter --json
    """
    import numpy as np

    from . import evaluate
    from .learned import ArtifactError, DataError, load
    from .learned.data import read_many

    try:
        rows = read_many(data_files)
        models = evaluate.common_models(rows)
        price_table = evaluate.load_prices(prices) if prices else None
    except DataError as e:
        _fail(str(e), EXIT_DATA, as_json)
    try:
        if router_path is not None:
            try:
                router = load(router_path, sha256)
            except ArtifactError as e:
                _fail(str(e), EXIT_ARTIFACT, as_json)
            unknown = [m for m in models if m not in router.models]
            if unknown:
                _fail(
                    f"the router was trained on {router.models} and does not know {unknown}: "
                    "retrain it on data that scores those models, "
                    "or evaluate on rows of its models",
                    EXIT_MISMATCH,
                    as_json,
                )
            cols = [router.models.index(m) for m in models]
            bar = _Bar(f"routing {len(rows)} prompts")
            pred = np.zeros((len(rows), len(models)))
            for i, row in enumerate(rows):
                pred[i] = router.predict_many([row["prompt"]])[0, cols]
                if i % 100 == 0:
                    bar(i / len(rows))
            bar.close()
            how: dict[str, Any] = {"router": str(router_path), "sha256": router.sha256}
        else:
            bar = _Bar(f"{folds}-fold cross-validation on {len(rows)} prompts")
            pred = evaluate.cross_predict(rows, models, k=folds, group=group, progress=bar)
            bar.close()
            how = {"router": None, "cross_validation": {"folds": folds, "group": group}}
        result = {"ok": True} | how | evaluate.report(rows, pred, models, price_table)
    except DataError as e:
        _fail(str(e), EXIT_DATA, as_json)
    if as_json:
        click.echo(json.dumps(result))
        return
    _print_human(result)


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "not reached"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def _print_human(r: dict[str, Any]) -> None:
    src = r["router"] or "cross-validated ({folds} folds by {group})".format(
        **r["cross_validation"]
    )
    click.echo(f"{r['rows']} prompts, models: {', '.join(r['models'])}; router: {src}")
    if r["kind"] == "two-model":
        click.echo(f"strong {r['strong']}, weak {r['weak']}")
        click.echo(f"{'':16}{'APGR':>8}{'CPT(50%)':>10}{'CPT(80%)':>10}{'saved@95%':>11}")
        lines = [
            ("router", r),
            ("random", r["baselines"]["random"]),
            ("oracle", r["baselines"]["oracle"]),
        ]
        lines += [(f"  {b}", m) for b, m in r.get("by_benchmark", {}).items()]
        for name, m in lines:
            click.echo(
                f"{name:16}{_fmt(m['apgr']):>8}{_fmt(m['cpt50'], True):>10}"
                f"{_fmt(m['cpt80'], True):>10}{_fmt(m['saving_at_95'], True):>11}"
            )
        b = r["baselines"]
        click.echo(
            f"always strong: quality {b['always_strong']['quality']}; "
            f"always weak: {b['always_weak']['quality']}"
        )
        if "cost_saving_at_95" in r:
            click.echo(
                f"dollar saving at 95% of strong quality: {_fmt(r['cost_saving_at_95'], True)}"
            )
        return
    b = r["baselines"]
    click.echo(
        f"best single model {r['best_model']}: quality {r['best_model_quality']}, "
        f"${r['best_model_cost']:.6f}/query"
    )
    for name, m in (("router", r), ("oracle", b["oracle"])):
        click.echo(
            f"{name:8} 95% quality at {_fmt(m['cost_ratio_at_95'], True)} of its cost, "
            f"100% at {_fmt(m['cost_ratio_at_100'], True)}"
        )
    click.echo(
        f"always cheapest ({b['always_cheapest']['model']}): "
        f"quality {b['always_cheapest']['quality']}, ${b['always_cheapest']['cost']:.6f}; "
        f"random: quality {b['random']['quality']}, ${b['random']['cost']:.6f}"
    )


if __name__ == "__main__":
    route()
