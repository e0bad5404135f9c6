"""Routing metrics on hand-computed examples, and the `route train` / `route eval` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _learned_support import PAIRS, POOL, PRICES
from click.testing import CliRunner
from veil_routing import evaluate
from veil_routing.learned import file_sha256
from veil_routing.route_cli import EXIT_ARTIFACT, EXIT_DATA, EXIT_MISMATCH, route

# Four prompts. Strong right on 0, 1, 2; weak right on 1 only.
# Quality: strong 0.75, weak 0.25, gap 0.5. The router ranks 0, 2, 1, 3:
# strong calls k = 0..4 give quality .25, .50, .75, .75, .75 -> PGR 0, .5, 1, 1, 1.
STRONG = [1.0, 1.0, 1.0, 0.0]
WEAK = [0.0, 1.0, 0.0, 0.0]
SCORE = [0.9, 0.2, 0.5, 0.1]


def test_apgr_is_the_area_under_the_pgr_curve() -> None:
    # trapezoids: (0+.5)/2, (.5+1)/2, 1, 1 -> mean 0.75
    assert evaluate.apgr(SCORE, STRONG, WEAK) == pytest.approx(0.75)
    assert list(evaluate.pgr_curve(SCORE, STRONG, WEAK)) == pytest.approx([0, 0.5, 1, 1, 1])


def test_cpt_is_the_smallest_strong_share_reaching_the_gain() -> None:
    assert evaluate.cpt(SCORE, STRONG, WEAK, 0.5) == pytest.approx(0.25)
    assert evaluate.cpt(SCORE, STRONG, WEAK, 0.8) == pytest.approx(0.5)


def test_pair_metrics_hand_computed() -> None:
    m = evaluate.pair_metrics(SCORE, STRONG, WEAK)
    # 95% of strong quality = .7125: reached with 2 of 4 strong calls -> saving 0.5
    assert m == {"apgr": 0.75, "cpt50": 0.25, "cpt80": 0.5, "saving_at_95": 0.5}


def test_a_reversed_router_is_worse_than_random() -> None:
    worst = [-s for s in SCORE]
    # order 3, 1, 2, 0: PGR 0, 0, 0, .5, 1 -> (0 + 0 + .25 + .75) / 4
    assert evaluate.apgr(worst, STRONG, WEAK) == pytest.approx(0.25)


def test_apgr_needs_a_better_strong_model() -> None:
    with pytest.raises(evaluate.DataError, match="undefined"):
        evaluate.apgr([1, 2], [0, 0], [1, 0])


def test_multi_model_cost_to_quality_hand_computed() -> None:
    # models: big (best, $10), mid ($2), small ($1); four prompts
    quality = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=float)
    cost = np.tile([10.0, 2.0, 1.0], (4, 1))
    # best single: big, quality .75 at $10. A perfect predictor picks small, mid, big,
    # small as price rises: mean quality .75 at (1 + 2 + 10 + 1) / 4 = $3.5.
    m = evaluate.multi_metrics(quality + 1e-6, quality, cost)
    assert m["cost_at_100"] == pytest.approx(3.5)
    assert m["cost_ratio_at_100"] == pytest.approx(0.35)
    # 95% of .75 = .7125 needs all three correct answers too -> the same point
    assert m["cost_at_95"] == pytest.approx(3.5)
    # a router that cannot tell prompts apart only has the three single models
    flat = np.tile([0.9, 0.6, 0.3], (4, 1))
    m = evaluate.multi_metrics(flat, quality, cost)
    assert m["cost_at_100"] == pytest.approx(10.0)


def test_costs_come_from_rows_or_prices() -> None:
    rows = [
        {"prompt": "x" * 400, "scores": {"a": 1, "b": 0}, "tokens": {"a": 10}},
        {"prompt": "y" * 40, "scores": {"a": 1, "b": 0}, "cost_usd": {"a": 0.5, "b": 0.25}},
    ]
    prices = {"a": (1.0, 2.0), "b": (0.5, 0.5)}
    c = evaluate.cost_matrix(rows, ["a", "b"], prices)
    assert c is not None
    # row 0: a = (1 * 100 + 2 * 10) / 1e6; b = (.5 * 100 + .5 * 1) / 1e6
    assert c[0] == pytest.approx([120e-6, 50.5e-6])
    assert c[1] == pytest.approx([0.5, 0.25])
    assert evaluate.cost_matrix(rows, ["a", "b"], None) is None


def test_topic_folds_keep_a_subject_together() -> None:
    rows = [
        {"id": f"mmlu/{s}/{i}", "prompt": f"{s} {i}", "scores": {}}
        for s in "abcdef"
        for i in range(5)
    ]
    folds = evaluate.folds_of(rows, 3, "topic")
    for s in "abcdef":
        assert len({f for r, f in zip(rows, folds, strict=True) if r["id"].split("/")[1] == s}) == 1


# ----------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def pool_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("art") / "pool.veilrouter"
    res = CliRunner().invoke(route, ["train", "--data", str(POOL), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)["sha256"]


def test_train_json_reports_the_sha256_to_pin(pool_artifact: tuple[Path, str]) -> None:
    out, sha = pool_artifact
    assert sha == file_sha256(out)


def test_train_prints_the_sha256_for_the_policy(tmp_path: Path) -> None:
    out = tmp_path / "p.veilrouter"
    res = CliRunner().invoke(route, ["train", "--data", str(PAIRS), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f'sha256 = "{file_sha256(out)}"' in res.stdout


def test_eval_multi_model_json_keys(pool_artifact: tuple[Path, str]) -> None:
    out, sha = pool_artifact
    res = CliRunner().invoke(
        route, ["eval", "--data", str(POOL), "--router", str(out), "--sha256", sha, "--json"]
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["kind"] == "multi-model"
    for key in ("cost_at_95", "cost_at_100", "best_model_cost", "cost_ratio_at_95"):
        assert key in r
    assert r["best_model"] == "gpt-4-1106-preview"
    assert set(r["baselines"]) == {"always_best", "always_cheapest", "random", "oracle"}
    # on its own training rows the router beats always-best
    assert r["cost_at_95"] is not None and r["cost_at_95"] < r["best_model_cost"]


def test_eval_two_model_cross_validated_json_keys() -> None:
    res = CliRunner().invoke(route, ["eval", "--data", str(PAIRS), "--folds", "3", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["kind"] == "two-model"
    assert r["strong"] == "gpt-4-1106-preview"
    for key in ("apgr", "cpt50", "cpt80", "saving_at_95"):
        assert key in r
    assert 0.0 <= r["apgr"] <= 1.2 and 0.0 <= r["cpt50"] <= 1.0
    assert r["cross_validation"] == {"folds": 3, "group": "question"}
    assert {"mmlu", "gsm8k"} <= set(r["by_benchmark"])
    assert r["baselines"]["random"]["apgr"] == 0.5


def test_eval_human_output_shows_router_and_baselines() -> None:
    res = CliRunner().invoke(
        route, ["eval", "--data", str(PAIRS), "--folds", "2", "--prices", str(PRICES)]
    )
    assert res.exit_code == 0, res.output
    assert "APGR" in res.stdout and "oracle" in res.stdout and "dollar saving" in res.stdout


def test_eval_refuses_a_tampered_router(pool_artifact: tuple[Path, str], tmp_path: Path) -> None:
    out, sha = pool_artifact
    bad = tmp_path / "bad.veilrouter"
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    res = CliRunner().invoke(
        route, ["eval", "--data", str(POOL), "--router", str(bad), "--sha256", sha, "--json"]
    )
    assert res.exit_code == EXIT_ARTIFACT
    assert json.loads(res.stdout)["ok"] is False
    assert "re-sign the policy" in res.stderr


def test_eval_router_that_does_not_know_the_models(pool_artifact: tuple[Path, str]) -> None:
    res = CliRunner().invoke(
        route, ["eval", "--data", str(PAIRS), "--router", str(pool_artifact[0])]
    )
    assert res.exit_code == EXIT_MISMATCH
    assert "retrain" in res.stderr


def test_eval_bad_data_exit_code_and_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "scores": {"a": 2}}\n')
    res = CliRunner().invoke(route, ["eval", "--data", str(bad)])
    assert res.exit_code == EXIT_DATA
    assert "bad.jsonl:1" in res.stderr and "0..1" in res.stderr


def test_eval_multi_model_without_costs_asks_for_prices(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": f"p{i}", "scores": {"a": i % 2, "b": 1, "c": 0}}) + "\n"
            for i in range(12)
        )
    )
    res = CliRunner().invoke(route, ["eval", "--data", str(rows), "--folds", "2"])
    assert res.exit_code == EXIT_DATA
    assert "--prices" in res.stderr


def test_train_missing_file_exit_code(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        route, ["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x")]
    )
    assert res.exit_code == EXIT_DATA
    assert "cannot read" in res.stderr
