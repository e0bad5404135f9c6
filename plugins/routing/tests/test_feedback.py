"""FeedbackStore: online per-(cluster, model) estimates that survive restarts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from _learned_support import DATA  # noqa: F401  (sets the import path)
from veil_routing.feedback import DB_NAME, FeedbackStore

PRED = {"big": 0.9, "small": 0.8}


def test_no_observations_keep_the_prediction(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path)
    assert store.adjust(3, PRED) == PRED
    store.close()


def test_feedback_moves_the_estimate_with_the_prior_weight(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, prior_weight=5.0)
    for i in range(5):
        store.remember(f"req-{i}", 2, "small")
        assert store.feedback(f"req-{i}", 0.0) is True
    # (5 * 0.8 + 0) / (5 + 5) = 0.4; other clusters and models untouched
    assert store.adjust(2, PRED) == pytest.approx({"big": 0.9, "small": 0.4})
    assert store.adjust(1, PRED) == PRED
    store.close()


def test_unknown_or_repeated_feedback_is_rejected(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path)
    assert store.feedback("never-seen", 1.0) is False
    store.remember("r1", 0, "big")
    assert store.feedback("r1", 1.0) is True
    assert store.feedback("r1", 1.0) is False
    with pytest.raises(ValueError, match="between 0 and 1"):
        store.feedback("r1", 1.5)
    store.close()


def test_expired_choices_get_no_feedback(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, ttl_s=-1.0)
    store.remember("r1", 0, "big")
    assert store.feedback("r1", 1.0) is False
    assert store.adjust(0, PRED) == PRED
    store.close()


def test_errors_lower_a_model_and_latency_is_averaged(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, prior_weight=5.0, latency_alpha=0.5)
    for _ in range(5):
        store.observe("big", 4, error=True, latency_s=None)
    store.observe("big", 4, error=False, latency_s=2.0)
    store.observe("big", 4, error=False, latency_s=1.0)
    # 5 errors in 7 calls, prior 5: 0.9 * (1 - 5 / 12)
    assert store.adjust(4, PRED)["big"] == pytest.approx(0.9 * (1 - 5 / 12))
    (est,) = store.estimates()
    assert est["latency_s"] == pytest.approx(1.5)
    store.close()


def test_estimates_and_pending_choices_survive_a_restart(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path)
    store.remember("before", 1, "small")
    store.remember("after", 1, "small")
    assert store.feedback("before", 1.0)
    store.observe("big", 1, error=True, latency_s=0.3)
    adjusted = store.adjust(1, PRED)
    store.close()
    assert (tmp_path / DB_NAME).exists()

    reopened = FeedbackStore(tmp_path)
    assert reopened.adjust(1, PRED) == pytest.approx(adjusted)
    assert adjusted != PRED
    assert reopened.feedback("after", 1.0) is True  # remembered before the restart
    assert reopened.feedback("before", 1.0) is False
    reopened.close()
    reopened.close()  # idempotent


def test_concurrent_feedback_counts_every_score(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, prior_weight=1.0)
    n_threads, per = 4, 50
    for t in range(n_threads):
        for i in range(per):
            store.remember(f"{t}-{i}", 0, "small")

    def work(t: int) -> None:
        for i in range(per):
            assert store.feedback(f"{t}-{i}", 0.0)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    (est,) = store.estimates()
    assert est["scores"] == n_threads * per
    # (1 * 0.8 + 0) / (1 + 200)
    assert store.adjust(0, PRED)["small"] == pytest.approx(0.8 / 201)
    store.close()


def test_pending_choices_are_bounded(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, max_pending=10)
    for i in range(1000):
        store.remember(f"r{i}", 0, "big")
    assert store.feedback("r0", 1.0) is False  # pruned: oldest beyond the bound
    assert store.feedback("r999", 1.0) is True
    store.close()


def test_prior_weight_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prior_weight"):
        FeedbackStore(tmp_path, prior_weight=0)
