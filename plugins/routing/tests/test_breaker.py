"""Circuit breakers: transitions with a controlled clock, one log line and one
metric per transition, and the breaker at work in the real gateway."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import structlog
import veil_routing
from routingtest import (
    HalfStream,
    Recorder,
    chat,
    client,
    http_dep,
    metric_value,
    mock_server,
    routing_policy,
)
from veil_routing.breaker import Breaker, BreakerBoard

from veil.testing import TEST_KEY, PolicyKit, ServerThread

Gateway = Callable[..., ServerThread]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: Clock, seen: list[tuple[str, str, str]]) -> Breaker:
    return Breaker(
        "dep",
        failures=3,
        window_s=10,
        cooldown_s=5,
        on_transition=lambda *t: seen.append(t),
        clock=clock,
    )


def test_opens_after_k_failures_within_the_window() -> None:
    clock, seen = Clock(), []
    b = _breaker(clock, seen)
    b.failure()
    b.failure()
    assert b.state == "closed" and b.available()
    b.failure()
    assert b.state == "open"
    assert not b.available()
    assert seen == [("dep", "closed", "open")]


def test_failures_outside_the_window_do_not_count() -> None:
    clock, seen = Clock(), []
    b = _breaker(clock, seen)
    b.failure()
    b.failure()
    clock.now += 11
    b.failure()
    assert b.state == "closed"
    b.failure()
    b.failure()
    assert b.state == "open"


def test_half_open_probe_success_closes() -> None:
    clock, seen = Clock(), []
    b = _breaker(clock, seen)
    for _ in range(3):
        b.failure()
    clock.now += 4.9
    assert not b.available()
    assert b.retry_in() == pytest.approx(0.1)
    clock.now += 0.2
    assert b.available()  # this call is the probe
    assert b.state == "half_open"
    assert not b.available()  # one probe at a time
    b.success()
    assert b.state == "closed"
    assert seen == [
        ("dep", "closed", "open"),
        ("dep", "open", "half_open"),
        ("dep", "half_open", "closed"),
    ]


def test_half_open_probe_failure_reopens_for_another_cooldown() -> None:
    clock, seen = Clock(), []
    b = _breaker(clock, seen)
    for _ in range(3):
        b.failure()
    clock.now += 5
    assert b.available()
    b.failure()
    assert b.state == "open"
    clock.now += 4
    assert not b.available()
    clock.now += 1
    assert b.available()
    assert [s[2] for s in seen] == ["open", "half_open", "open", "half_open"]


def test_a_probe_that_never_reports_is_replaced_after_a_cooldown() -> None:
    clock, seen = Clock(), []
    b = _breaker(clock, seen)
    for _ in range(3):
        b.failure()
    clock.now += 5
    assert b.available()
    clock.now += 1
    assert not b.available()
    clock.now += 4
    assert b.available()


def test_each_transition_is_logged() -> None:
    clock, seen = Clock(), []
    b = _breaker(clock, seen)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            b.failure()
        clock.now += 5
        b.available()
        b.success()
    lines = [(e["event"], e["deployment"], e["old"], e["new"]) for e in logs]
    assert lines == [
        ("routing_breaker", "dep", "closed", "open"),
        ("routing_breaker", "dep", "open", "half_open"),
        ("routing_breaker", "dep", "half_open", "closed"),
    ]


def test_breaker_in_the_gateway(routing_gateway: Gateway) -> None:
    with mock_server(fail_rate=1.0, fail_status=503) as bad, mock_server() as good:
        gw = routing_gateway(
            [http_dep("primary", bad.url), http_dep("backup", good.url)],
            {
                "aliases": {"chain": {"targets": ["primary", "backup"]}},
                "breaker": {"failures": 2, "window_s": 60, "cooldown_s": 0.5},
            },
        )
        for _ in range(2):
            assert chat(gw, "chain")[0].model == "up-backup"
        assert bad.app.settings.stats["requests"] == 2
        state = "veil_routing_breaker_state"
        assert metric_value(gw, state, deployment="primary") == 2
        # open: the primary is skipped, the backup answers at once
        _, headers = chat(gw, "chain")
        assert headers["x-veil-model"] == "backup"
        assert headers["x-veil-route"] == "alias=chain; deployment=backup"
        assert bad.app.settings.stats["requests"] == 2
        # after the cooldown one probe goes to the (now healthy) primary and closes it
        bad.app.settings.fail_rate = 0.0
        time.sleep(0.6)
        assert chat(gw, "chain")[0].model == "up-primary"
        assert metric_value(gw, state, deployment="primary") == 0
        transitions = "veil_routing_breaker_transitions_total"
        for new in ("open", "half_open", "closed"):
            assert metric_value(gw, transitions, deployment="primary", state=new) == 1


def test_streams_that_break_half_way_open_the_breaker(routing_gateway: Gateway) -> None:
    # a deployment that accepts streams and then breaks them is failing, even
    # though each attempt looked fine when the first chunk arrived
    half = HalfStream()
    with ServerThread(half) as broken, mock_server() as good:
        gw = routing_gateway(
            [http_dep("primary", broken.url), http_dep("backup", good.url)],
            {
                "aliases": {"chain": {"targets": ["primary", "backup"]}},
                "breaker": {"failures": 2, "window_s": 60, "cooldown_s": 60},
            },
        )

        def stream() -> str:
            parts = client(gw).chat.completions.create(
                model="chain", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in parts if c.choices)

        for _ in range(2):
            with pytest.raises(openai.APIError):
                stream()  # half-sent: never retried elsewhere
        assert half.requests == 2
        assert metric_value(gw, "veil_routing_breaker_state", deployment="primary") == 2
        assert stream()  # the open breaker sends it to the backup at once
        assert half.requests == 2
        assert good.app.settings.stats["requests"] == 1


def test_a_board_hands_on_breakers_of_unchanged_deployments_only() -> None:
    carried: dict[object, Breaker] = {}

    def board(cooldown_s: float = 5) -> BreakerBoard:
        return BreakerBoard(
            failures=1, window_s=10, cooldown_s=cooldown_s, on_transition=lambda *t: None,
            carried=carried,
        )  # fmt: skip

    first = board()
    first.get("a", ("a", "http://a")).failure()
    first.get("b", ("b", "http://b"))
    second = board()
    assert second.get("a", ("a", "http://a")).state == "open"  # the same upstream
    assert second.get("b", ("b", "http://b2")).state == "closed"  # moved: a new breaker
    second.forget_others()
    assert len(carried) == 2
    assert board(cooldown_s=9).get("a", ("a", "http://a")).state == "closed"  # new settings


def test_an_open_breaker_survives_a_policy_reload(
    policy_kit: PolicyKit, start_gateway: Callable[..., ServerThread], recorder: Recorder
) -> None:
    with mock_server(fail_rate=1.0, fail_status=503) as bad, mock_server() as good:
        routing = {
            "aliases": {"chain": {"targets": ["primary", "backup"]}},
            "breaker": {"failures": 1, "window_s": 60, "cooldown_s": 60},
        }

        def write(version: int, primary_url: str) -> Path:
            deps = [http_dep("primary", primary_url), http_dep("backup", good.url)]
            return policy_kit.write(routing_policy(deps, routing, version=version), "reload.toml")

        path = write(1, bad.url)
        gw = start_gateway(
            path, plugins={"routing": veil_routing, "recorder": recorder}, watch_interval=0
        )
        chat(gw, "chain")  # the primary fails once: its breaker opens
        assert bad.app.settings.stats["requests"] == 1
        write(2, bad.url)  # a new policy, the primary unchanged
        assert gw.call(gw.gateway.reload()) is True
        assert chat(gw, "chain")[1]["x-veil-model"] == "backup"
        assert bad.app.settings.stats["requests"] == 1  # still skipped
        assert metric_value(gw, "veil_routing_breaker_state", deployment="primary") == 2
        with mock_server() as moved:
            write(3, moved.url)  # the primary now points elsewhere: a fresh breaker
            assert gw.call(gw.gateway.reload()) is True
            assert chat(gw, "chain")[1]["x-veil-model"] == "primary"
            assert moved.app.settings.stats["requests"] == 1


def test_all_breakers_open_is_a_503_with_retry_after(routing_gateway: Gateway) -> None:
    with mock_server(fail_rate=1.0, fail_status=500) as bad:
        gw = routing_gateway(
            [http_dep("only", bad.url)],
            {"breaker": {"failures": 1, "window_s": 60, "cooldown_s": 30}},
        )
        with pytest.raises(openai.InternalServerError):
            chat(gw, "only")
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {TEST_KEY}"},
            json={"model": "only", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "deployments_unavailable"
        assert 1 <= int(r.headers["retry-after"]) <= 30
        assert bad.app.settings.stats["requests"] == 1


def test_a_request_error_does_not_count_against_the_deployment(routing_gateway: Gateway) -> None:
    with mock_server(fail_rate=1.0, fail_status=400) as bad:
        gw = routing_gateway([http_dep("only", bad.url)], {"breaker": {"failures": 1}})
        for _ in range(3):
            with pytest.raises(openai.BadRequestError):
                chat(gw, "only")
        assert bad.app.settings.stats["requests"] == 3


def test_admin_route_shows_breakers_and_latency(routing_gateway: Gateway) -> None:
    from veil.testing import ADMIN_KEY

    with mock_server(fail_rate=1.0, fail_status=503) as bad, mock_server() as good:
        gw = routing_gateway(
            [http_dep("primary", bad.url), http_dep("backup", good.url)],
            {
                "aliases": {"chain": {"targets": ["primary", "backup"]}},
                "breaker": {"failures": 1, "cooldown_s": 60},
            },
        )
        chat(gw, "chain")
        r = httpx.get(gw.url + "/admin/routing", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 200
        state = {d["deployment"]: d for d in r.json()["data"]}
        assert state["primary"]["breaker"] == "open"
        assert state["backup"]["breaker"] == "closed"
        assert state["backup"]["latency_ewma_ms"] > 0
        assert state["primary"]["latency_ewma_ms"] is None
        denied = httpx.get(
            gw.url + "/admin/routing", headers={"authorization": f"Bearer {TEST_KEY}"}
        )
        assert denied.status_code == 403
