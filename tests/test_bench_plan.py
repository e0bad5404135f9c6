"""The stage-CPU benchmarks' plan: every gateway is measured first as often as second."""

from __future__ import annotations

from collections import Counter

from bench.stage_cpu import make_plan, step_groups


def test_the_order_of_each_pair_alternates_between_rounds() -> None:
    targets = ["core", "audit"]
    steps = make_plan(targets, ["nonstream", "stream"], [1, 16], 6, 2, 4)
    measured = [s for s in steps if s.kind == "measure"]
    assert len(measured) == 4 * 2 * 2 * len(targets)
    firsts: Counter[tuple[str, int, str]] = Counter()
    for pair in zip(measured[::2], measured[1::2], strict=True):
        a, b = pair
        assert (a.mode, a.conns, a.round) == (b.mode, b.conns, b.round)
        assert {a.target, b.target} == set(targets)
        firsts[(a.mode, a.conns, a.target)] += 1
    # in each cell, each gateway goes first in half the rounds
    assert set(firsts.values()) == {2}
    assert len(firsts) == 2 * 2 * len(targets)
    # and within a round, neighbouring cells alternate too
    first_round = [a.target for a in measured[: 2 * 2 * 2 : 2]]
    assert first_round == ["core", "audit", "core", "audit"]


def test_warm_ups_come_once_before_each_mode_of_the_first_round() -> None:
    steps = make_plan(["core", "budget", "redis"], ["nonstream"], [1], 6, 2, 2)
    warm = [s for s in steps if s.kind == "warmup"]
    assert [s.target for s in warm] == ["core", "budget", "redis"]
    assert steps[:3] == warm


def test_paired_runs_every_gateway_of_a_cell_together_and_only_those() -> None:
    targets = ["core", "sqlite", "redis"]
    steps = make_plan(targets, ["nonstream", "stream"], [1, 16], 6, 2, 2)
    assert step_groups(steps, paired=False) == [[i] for i in range(len(steps))]
    groups = step_groups(steps, paired=True)
    assert sorted(i for g in groups for i in g) == list(range(len(steps)))
    for g in groups:
        cell = {(steps[i].kind, steps[i].round, steps[i].mode, steps[i].conns) for i in g}
        assert len(cell) == 1  # one kind, round, mode and connection count
        assert sorted(steps[i].target for i in g) == sorted(targets)  # each gateway once
    # warm-ups of 2 modes, then 2 rounds x 2 modes x 2 connection counts
    assert len(groups) == 2 + 2 * 2 * 2


def test_paired_gateways_share_the_mock_s_cpu_by_every_request_it_served() -> None:
    from bench.harness import Sample
    from bench.load import LoadResult
    from bench.stage_cpu import _share_upstream

    def sample(requests: int, mock_ms_per_req: float) -> Sample:
        load = LoadResult(requests, 6.0, requests / 6, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0)
        return Sample(load, 0.5, mock_ms_per_req, 50.0, 0.0)

    # the mock spent 300 ms in the window; each gateway's own count made it look
    # like 0.3 and 0.6 ms per request behind the faster and the slower one
    fast, slow = sample(1000, 0.3), sample(500, 0.6)
    _share_upstream([fast, slow])
    assert fast.upstream_cpu_ms_per_req == slow.upstream_cpu_ms_per_req == 0.2
