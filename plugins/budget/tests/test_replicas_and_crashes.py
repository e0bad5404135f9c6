"""The bound across gateway processes: two replicas sharing one real
``redis-server``, a gateway killed with SIGKILL under load, and the tools
around the store (tiktoken with the network blocked, ``veil budget``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from budgettest import CALL_USD, burst, fixed_usage, run

from veil.testing import ADMIN_KEY, GatewayProcess, PolicyKit, RedisServer, ServerThread

FIT = 50


def _team_budget(limit_usd: float) -> dict[str, object]:
    return {"scope": "team", "id": "test", "period": "month", "limit_usd": limit_usd}


def _spend(url: str) -> dict[str, object]:
    r = httpx.get(url + "/admin/spend", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def _settled_spend(url: str, timeout: float = 5.0) -> dict[str, object]:
    """``/admin/spend`` once no reservation is left: a Redis replica sends
    its settles within a millisecond after its answers, another replica's
    may still be on their way when this one is asked."""
    deadline = time.monotonic() + timeout
    while True:
        report = _spend(url)
        budgets: Any = report["budgets"]
        if all(b["reserved_usd"] == 0 for b in budgets) or time.monotonic() > deadline:
            return report
        time.sleep(0.01)


@contextmanager
def redis_replicas(
    policy: Path, kit: PolicyKit, redis_server: RedisServer, tmp_path: Path, count: int = 2
) -> Iterator[list[GatewayProcess]]:
    """``count`` ``veil serve`` processes running ``policy`` on the flushed ``redis_server``."""
    redis_server.command("FLUSHALL")
    env = {"VEIL_BUDGET_REDIS_URL": redis_server.url}
    replicas = [
        GatewayProcess(policy, kit.public_key_path, state_dir=tmp_path / f"s{i}", env=env)
        for i in range(count)
    ]
    try:
        for r in replicas:
            r.wait_ready(60)
        yield replicas
    finally:
        for r in replicas:
            r.stop()


def _served(results: list[object]) -> list[object]:
    """The answers among ``results``; every other one must be a budget refusal."""
    refused = [r for r in results if not isinstance(r, str)]
    assert all(
        isinstance(e, openai.RateLimitError) and e.code == "budget_exceeded" for e in refused
    )
    return [r for r in results if isinstance(r, str)]


def test_two_replicas_sharing_redis_hold_the_limit_together(
    budget_policy: Callable[..., Path],
    policy_kit: PolicyKit,
    mock_upstream: ServerThread,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    fixed_usage(mock_upstream)
    mock_upstream.app.settings.latency_ms = 20  # calls overlap across the replicas
    # every call checked in Redis on its own: exact within one burst (with
    # leases, what one replica's lease holds when its burst ends waits for
    # the lease to come back: the next test)
    policy = budget_policy(store="redis", budgets=[_team_budget(FIT * CALL_USD)], lease_calls=0)
    with redis_replicas(policy, policy_kit, redis_server, tmp_path) as replicas:

        async def both() -> list[object]:
            import asyncio

            a, b = await asyncio.gather(*(burst(r.url, 100) for r in replicas))
            return [*a, *b]

        assert len(_served(run(both()))) == FIT
        for r in replicas:  # both replicas see the one shared total
            report = _settled_spend(r.url)
            assert report["calls"] == FIT
            assert report["total_usd"] == pytest.approx(FIT * CALL_USD)
            (status,) = report["budgets"][:1]
            assert status["spent_usd"] <= FIT * CALL_USD + 1e-9
            assert status["reserved_usd"] == 0


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_two_leasing_replicas_serve_from_leases_and_hold_the_limit(
    budget_policy: Callable[..., Path],
    policy_kit: PolicyKit,
    mock_upstream: ServerThread,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    # room for 1,200 calls; the leases of both replicas together hold at most a
    # quarter of the room left, and none below two calls' worth: exact at the end
    fixed_usage(mock_upstream)
    mock_upstream.app.settings.latency_ms = 5
    fit = 1_200
    policy = budget_policy(store="redis", budgets=[_team_budget(fit * CALL_USD)], lease_headroom=4)
    with redis_replicas(policy, policy_kit, redis_server, tmp_path) as replicas:

        async def rounds() -> list[object]:
            import asyncio

            results: list[object] = []
            refused_rounds = 0
            while refused_rounds < 3:  # until the leases have surely come back
                a, b = await asyncio.gather(*(burst(r.url, 16) for r in replicas))
                results += [*a, *b]
                if all(not isinstance(x, str) for x in [*a, *b]):
                    refused_rounds += 1
                    await asyncio.sleep(0.1)
            return results

        assert len(_served(run(rounds()))) == fit
        report = _settled_spend(replicas[0].url)
        assert report["calls"] == fit
        (status,) = report["budgets"][:1]
        assert status["spent_usd"] == pytest.approx(fit * CALL_USD)
        assert status["reserved_usd"] == 0
        for r in replicas:  # each served most of its calls without a round trip
            leased = _metric(r.url, 'veil_budget_lease_calls_total{outcome="served"}')
            assert leased > fit / 5
            # and Redis acknowledged every settle its outbox kept
            assert "veil_budget_outbox_unacked 0.0" in httpx.get(r.url + "/metrics").text


def test_calls_sending_the_same_request_id_share_no_reservation_in_redis(
    budget_policy: Callable[..., Path],
    policy_kit: PolicyKit,
    mock_upstream: ServerThread,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    fixed_usage(mock_upstream)
    mock_upstream.app.settings.latency_ms = 20
    policy = budget_policy(store="redis", budgets=[_team_budget(FIT * CALL_USD)])
    with redis_replicas(policy, policy_kit, redis_server, tmp_path, count=1) as (gw,):
        results = run(burst(gw.url, 200, request_id="same-id"))
        assert sum(isinstance(r, str) for r in results) == FIT
        (status,) = _settled_spend(gw.url)["budgets"][:1]
        assert status["spent_usd"] == pytest.approx(FIT * CALL_USD)
        assert status["reserved_usd"] == 0


def test_a_replica_that_loses_redis_refuses(
    budget_policy: Callable[..., Path],
    policy_kit: PolicyKit,
    mock_upstream: ServerThread,
    tmp_path: Path,
) -> None:
    with RedisServer() as own:
        policy = budget_policy(store="redis", budgets=[_team_budget(10.0)])
        env = {"VEIL_BUDGET_REDIS_URL": own.url}
        with GatewayProcess(policy, policy_kit.public_key_path, state_dir=tmp_path, env=env) as gw:
            served = run(burst(gw.url, 3))
            assert all(isinstance(r, str) for r in served)
            own.stop()
            (lost,) = run(burst(gw.url, 1))
            assert isinstance(lost, openai.APIStatusError)
            assert lost.status_code == 503 and lost.code == "budget_unavailable"


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_kill_9_under_load_keeps_committed_spend(
    budget_policy: Callable[..., Path],
    policy_kit: PolicyKit,
    mock_upstream: ServerThread,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    """SQLite: the settle journal; Redis: the outbox, which the restarted
    gateway sends (leases on: the calls are served from one, their charges
    wait 10 ms for company)."""
    fixed_usage(mock_upstream)
    mock_upstream.app.settings.latency_ms = 10
    state = tmp_path / "state"
    env: dict[str, str] = {}
    section: dict[str, Any] = {"sqlite_path": "budget.sqlite3"}
    if store == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        redis_server.command("FLUSHALL")
        env = {"VEIL_BUDGET_REDIS_URL": redis_server.url}
        section = {"store": "redis", "lease_calls": 16}
    policy = budget_policy(budgets=[_team_budget(1000 * CALL_USD)], **section)
    gw = GatewayProcess(policy, policy_kit.public_key_path, state_dir=state, env=env)
    gw.wait_ready(60)
    served: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-veil-test-key", max_retries=0) as c:
            while not stop.is_set():
                try:
                    c.chat.completions.create(
                        model="priced", messages=[{"role": "user", "content": "hi"}], max_tokens=100
                    )
                    served.append("ok")
                except (openai.APIError, httpx.HTTPError):
                    return

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(served) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    gw.send_signal(signal.SIGKILL)
    gw.wait(10)
    stop.set()
    for t in threads:
        t.join(10)
    gw.stop()
    assert len(served) >= 60
    with GatewayProcess(policy, policy_kit.public_key_path, state_dir=state, env=env) as again:
        report = _spend(again.url)  # (Redis: the report waits for the outbox to be sent)
    # every call the clients saw answered was settled before its answer left
    assert report["calls"] >= len(served)
    assert report["total_usd"] >= len(served) * CALL_USD - 1e-9
    # and nothing more than the calls that reached the upstream (Redis: plus
    # a batch Redis may have run just before the kill, sent again: at most
    # the 8 clients' calls of the last 10 ms)
    slack = 8 if store == "redis" else 0
    assert report["calls"] <= mock_upstream.app.settings.stats["requests"] + slack


def test_tiktoken_counts_with_the_network_blocked(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import socket
        def refuse(*args, **kwargs):
            raise OSError("network blocked by the test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from veil_budget.tokens import count_tokens
        print(count_tokens("Hello, world! Budgets hold."))
        """
    )
    env_cache = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")}
    import os

    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **env_cache},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 8  # Hello , world ! Budget s hold .


def test_veil_budget_report_and_reset(
    budget_gateway: Callable[..., ServerThread],
    budget_policy: Callable[..., Path],
    mock_upstream: ServerThread,
    tmp_path: Path,
) -> None:
    fixed_usage(mock_upstream)
    policy = budget_policy(budgets=[_team_budget(3 * CALL_USD)], sqlite_path="b.sqlite3")
    import veil_budget

    gw = budget_gateway(
        budgets=[_team_budget(3 * CALL_USD)], sqlite_path=str(tmp_path / "b.sqlite3")
    )
    served = run(burst(gw.url, 5))
    assert sum(isinstance(r, str) for r in served) == 3

    def veil(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "veil", "budget", *args, "--policy", str(policy),
             "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    out = veil("report", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["calls"] == 3 and report["by_team"][0]["team"] == "test"
    assert report["total_usd"] == pytest.approx(3 * CALL_USD)
    text = veil("report", "--by", "model")
    assert "priced" in text.stdout and "3 calls" in text.stdout
    out = veil("reset", "--scope", "team", "--id", "test", "--yes")
    assert out.returncode == 0, out.stderr
    assert "reset 1 budget period" in out.stdout
    time.sleep(0.3)  # the serving gateway looks for other processes' commits every 0.25 s
    served = run(burst(gw.url, 5))
    assert sum(isinstance(r, str) for r in served) == 3
    assert veil("report", "--since", "not-a-day").returncode == 2
    assert veil_budget.__version__ == "0.1.0"
