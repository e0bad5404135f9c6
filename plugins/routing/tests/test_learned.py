"""The learned router: training, predictions, artifacts and their SHA-256 pin."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from _learned_support import PAIRS, POOL
from veil_routing import learned
from veil_routing.learned.data import read_jsonl

STRONG = "gpt-4-1106-preview"
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"


@pytest.fixture(scope="module")
def pairs_router() -> learned.QualityRouter:
    return learned.train(read_jsonl(PAIRS))


def test_public_names_are_sorted_and_complete() -> None:
    assert learned.__all__ == sorted(learned.__all__)
    for name in ("ArtifactError", "QualityRouter", "file_sha256", "load", "train"):
        assert name in learned.__all__


def test_predict_gives_every_model_a_probability(pairs_router: learned.QualityRouter) -> None:
    assert pairs_router.models == [STRONG, WEAK]
    p = pairs_router.predict("What is 17 * 23? Show your work.")
    assert set(p) == {STRONG, WEAK}
    assert all(0.0 < v < 1.0 for v in p.values())
    assert pairs_router.predict("").keys() == p.keys()


def test_router_learns_which_model_answers_which_kind_of_prompt() -> None:
    maths = [f"compute the integral of x^{i} dx from 0 to {i}" for i in range(40)]
    poems = [f"write a short poem about the colour number {i} of autumn leaves" for i in range(40)]
    rows = [{"prompt": p, "scores": {"mathbot": 1.0, "poet": 0.0}} for p in maths]
    rows += [{"prompt": p, "scores": {"mathbot": 0.0, "poet": 1.0}} for p in poems]
    router = learned.train(rows, n_clusters=2)
    m = router.predict("compute the integral of x^99 dx from 0 to 7")
    p = router.predict("write a short poem about autumn leaves falling")
    assert m["mathbot"] > 0.6 > m["poet"]
    assert p["poet"] > 0.6 > p["mathbot"]
    assert router.cluster("compute the integral of x^2 dx") != router.cluster(
        "write a poem about leaves"
    )


def test_soft_scores_and_partly_scored_rows_train() -> None:
    rows = [
        {"prompt": "explain tides", "scores": {"a": 0.7, "b": 0.2}},
        {"prompt": "explain gravity", "scores": {"a": 0.9}},
        {"prompt": "write a haiku", "scores": {"a": 0.1, "b": 0.8}},
        {"prompt": "write a sonnet", "scores": {"b": 1.0}},
    ]
    router = learned.train(rows, min_df=1)
    assert router.models == ["a", "b"]
    assert router.predict("explain tides")["a"] > router.predict("write a haiku")["a"]


def test_output_tokens_come_from_the_rows_tokens(pairs_router: learned.QualityRouter) -> None:
    assert set(pairs_router.length_models) == {STRONG, WEAK}
    gsm = (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether in April and May?"
    )
    essay = (
        "Write a persuasive essay on the benefits of public libraries, with an introduction, "
        "three arguments and a conclusion."
    )
    short = pairs_router.predict_output_tokens(gsm)
    long = pairs_router.predict_output_tokens(essay)
    assert all(v >= 1 for v in short.values())
    assert long[STRONG] > short[STRONG]


def test_models_without_length_data_get_the_default() -> None:
    rows = [
        {"prompt": f"q{i} about topic {i % 3}", "scores": {"a": i % 2, "b": 1.0}} for i in range(30)
    ]
    router = learned.train(rows)
    assert router.length_models == []
    assert router.predict_output_tokens("q1") == {"a": 256, "b": 256}


def test_cluster_ids_are_small_and_stable(pairs_router: learned.QualityRouter) -> None:
    ids = {pairs_router.cluster(r["prompt"]) for r in read_jsonl(PAIRS)}
    assert ids <= set(range(pairs_router.n_clusters))
    assert len(ids) > 1
    assert pairs_router.n_clusters <= 8


def test_save_load_round_trip_keeps_predictions(
    pairs_router: learned.QualityRouter, tmp_path: Path
) -> None:
    path = tmp_path / "pairs.veilrouter"
    sha = pairs_router.save(path)
    assert sha == learned.file_sha256(path)
    loaded = learned.load(path, sha)
    assert loaded.models == pairs_router.models
    assert loaded.sha256 == sha
    for row in list(read_jsonl(PAIRS))[:20]:
        a, b = pairs_router.predict(row["prompt"]), loaded.predict(row["prompt"])
        assert all(abs(a[m] - b[m]) < 2e-3 for m in a)  # weights are stored as float16
        assert loaded.cluster(row["prompt"]) in range(loaded.n_clusters)
    assert loaded.meta["trained_rows"] == 220


def test_training_is_deterministic(tmp_path: Path) -> None:
    rows = list(read_jsonl(POOL))
    a = learned.train(rows).save(tmp_path / "a.veilrouter")
    b = learned.train(rows).save(tmp_path / "b.veilrouter")
    assert a == b


def test_tampered_artifact_is_refused(pairs_router: learned.QualityRouter, tmp_path: Path) -> None:
    path = tmp_path / "r.veilrouter"
    sha = pairs_router.save(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(learned.ArtifactError, match="policy pins"):
        learned.load(path, sha)


def test_swapped_artifact_is_refused(tmp_path: Path) -> None:
    rows = list(read_jsonl(POOL))
    first = learned.train(rows[:60])
    sha = first.save(tmp_path / "r.veilrouter")
    learned.train(rows[40:]).save(
        tmp_path / "r.veilrouter"
    )  # a valid router, but not the pinned one
    with pytest.raises(learned.ArtifactError, match="changed or swapped"):
        learned.load(tmp_path / "r.veilrouter", sha)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a router at all",
        b"VEILRTR\x01\xff\xff\x00\x00{",
        b"VEILRTR\x01\x02\x00\x00\x00{}",
    ],
)
def test_garbage_is_not_a_router(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.veilrouter"
    path.write_bytes(content)
    with pytest.raises(learned.ArtifactError, match="veil route train"):
        learned.load(path, None)


def test_damaged_arrays_are_refused(pairs_router: learned.QualityRouter, tmp_path: Path) -> None:
    path = tmp_path / "r.veilrouter"
    pairs_router.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(learned.ArtifactError, match="damaged"):
        learned.load(path, None)


def test_newer_format_version_says_to_retrain(
    pairs_router: learned.QualityRouter, tmp_path: Path
) -> None:
    path = tmp_path / "r.veilrouter"
    pairs_router.save(path)
    data = path.read_bytes().replace(b'"version":1', b'"version":9', 1)
    path.write_bytes(data)
    with pytest.raises(learned.ArtifactError, match="retrain"):
        learned.load(path, None)


def test_missing_artifact_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(learned.ArtifactError, match="Check the path"):
        learned.load(tmp_path / "nope.veilrouter", None)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"scores": {"a": 1}}, '"prompt"'),
        ({"prompt": "x"}, '"scores"'),
        ({"prompt": "x", "scores": {"a": 1.5}}, "0..1"),
        ({"prompt": "x", "scores": {"a": True}}, "0..1"),
        ({"prompt": "x", "scores": {"a": 1}, "tokens": {"a": -3}}, "non-negative"),
    ],
)
def test_bad_rows_say_what_is_wrong(row: dict[str, object], message: str) -> None:
    with pytest.raises(learned.DataError, match=message):
        learned.train([row, {"prompt": "y", "scores": {"a": 0.0}}])


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "a", "scores": {"m": 1}}) + "\n{oops\n")
    with pytest.raises(learned.DataError, match="rows.jsonl:2"):
        list(read_jsonl(path))


def test_unknown_training_option_is_refused() -> None:
    with pytest.raises(TypeError, match="n_trees"):
        learned.train([{"prompt": "a", "scores": {"m": 1}}] * 2, n_trees=3)


def test_progress_is_reported_up_to_done() -> None:
    seen: list[float] = []
    learned.train(read_jsonl(POOL), progress=lambda _label, f: seen.append(f))
    assert seen == sorted(seen)
    assert seen[-1] == 1.0


def test_predict_is_thread_safe(pairs_router: learned.QualityRouter) -> None:
    prompts = [r["prompt"] for r in read_jsonl(PAIRS)]
    expected = [pairs_router.predict(p) for p in prompts]
    results: dict[int, list[dict[str, float]]] = {}

    def work(k: int) -> None:
        results[k] = [pairs_router.predict(p) for p in prompts]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[k] == expected for k in range(4))


def test_the_shipped_router_matches_its_pin_and_routes_maths_to_gpt4() -> None:
    from veil_routing.learned import pretrained

    assert learned.file_sha256(pretrained.GPT4_MIXTRAL) == pretrained.GPT4_MIXTRAL_SHA256
    assert pretrained.GPT4_MIXTRAL.stat().st_size < 1_000_000
    router = learned.load(pretrained.GPT4_MIXTRAL, pretrained.GPT4_MIXTRAL_SHA256)
    assert tuple(router.models) == pretrained.GPT4_MIXTRAL_MODELS
    maths = (
        "A bakery sells 3 cakes for $14 and 5 pies for $22. Mia buys 6 cakes and 10 pies, "
        "pays with $100 and gets a 10% discount on the total. How much change does she get?"
    )
    trivia = "Which of these is a primary colour?\nA. Green\nB. Red\nC. Purple\nD. Orange\nAnswer:"
    gap = {p: router.predict(p)[STRONG] - router.predict(p)[WEAK] for p in (maths, trivia)}
    assert gap[maths] > gap[trivia]
    essay = "Write a travel blog post about a recent trip to Hawaii, with cultural experiences."
    assert router.predict_output_tokens(essay)[STRONG] > router.predict_output_tokens(maths)[STRONG]
