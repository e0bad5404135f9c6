"""The OpenAI-compatible adapter: retries, failover, upstream errors,
timeouts, and cancelling the upstream when the client goes away."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from veil.mock.server import MockSettings, MockUpstream
from veil.testing import TEST_KEY, PolicyKit, ServerThread, free_port, policy_toml

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def upstreams() -> Iterator[dict[str, ServerThread]]:
    servers = {
        "down503": ServerThread(MockUpstream(MockSettings(fail_rate=1.0, fail_status=503))),
        "limited": ServerThread(MockUpstream(MockSettings(fail_rate=1.0, fail_status=429))),
        "bad400": ServerThread(MockUpstream(MockSettings(fail_rate=1.0, fail_status=400))),
        "ok": ServerThread(MockUpstream()),
        "slow": ServerThread(MockUpstream(MockSettings(latency_ms=2000))),
        "dribble": ServerThread(MockUpstream(MockSettings(chunk_delay_ms=100))),
    }
    for s in servers.values():
        s.start()
    yield servers
    for s in servers.values():
        s.stop()


def _dep(name: str, server: ServerThread | str, **kw: object) -> dict[str, object]:
    base = server if isinstance(server, str) else server.url
    return {
        "name": name,
        "provider": "openai",
        "model": f"up-{name}",
        "api_base": base + "/v1",
        "max_retries": 0,
        **kw,
    }


def _client(gw: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0)


def _stats(s: ServerThread) -> dict[str, int]:
    return s.app.settings.stats


def test_failover_down_the_chain(policy_kit: PolicyKit, start_gateway, upstreams) -> None:  # noqa: ANN001
    deps = [
        _dep("chain", upstreams["down503"], max_retries=1),
        _dep("chain", upstreams["limited"]),
        _dep("chain", upstreams["ok"]),
    ]
    gw = start_gateway(
        policy_kit.write(policy_toml(deployments=deps, gateway={"retry_backoff_ms": 1}))
    )
    with _client(gw) as c:
        raw = c.chat.completions.with_raw_response.create(model="chain", messages=MSG)
        assert raw.parse().model == "up-chain"
        list(c.chat.completions.create(model="chain", messages=MSG, stream=True))
    assert _stats(upstreams["down503"])["requests"] == 4  # 1 try + 1 retry, twice
    assert _stats(upstreams["limited"])["requests"] == 2
    assert _stats(upstreams["ok"])["requests"] == 2
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'veil_upstream_errors_total{kind="upstream_error",model="chain"} 4.0' in metrics


def test_connect_error_fails_over(policy_kit: PolicyKit, start_gateway, upstreams) -> None:  # noqa: ANN001
    nobody = f"http://127.0.0.1:{free_port()}"
    deps = [_dep("m", nobody), _dep("m", upstreams["ok"])]
    gw = start_gateway(policy_kit.write(policy_toml(deployments=deps)))
    with _client(gw) as c:
        assert c.chat.completions.create(model="m", messages=MSG).choices


def test_exhausted_chain_reports_upstream_trouble(
    policy_kit: PolicyKit, start_gateway, upstreams
) -> None:  # noqa: ANN001
    nobody = f"http://127.0.0.1:{free_port()}"
    deps = [
        _dep("down", upstreams["down503"]),
        _dep("gone", nobody),
        _dep("rl", upstreams["limited"]),
    ]
    gw = start_gateway(policy_kit.write(policy_toml(deployments=deps)))
    with _client(gw) as c:
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="down", messages=MSG)
        assert e.value.status_code == 502
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="gone", messages=MSG)
        assert e.value.status_code == 503 and e.value.code == "upstream_unavailable"
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="rl", messages=MSG)
        assert e.value.code == "upstream_rate_limited"


def test_upstream_client_errors_pass_through_without_failover(
    policy_kit: PolicyKit,
    start_gateway,
    upstreams,  # noqa: ANN001
) -> None:
    deps = [_dep("m", upstreams["bad400"]), _dep("m", upstreams["ok"])]
    gw = start_gateway(policy_kit.write(policy_toml(deployments=deps)))
    with _client(gw) as c, pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=MSG)
    assert e.value.body["message"] == "mock failure"
    assert _stats(upstreams["ok"])["requests"] == 0


def test_upstream_timeout_is_504(policy_kit: PolicyKit, start_gateway, upstreams) -> None:  # noqa: ANN001
    deps = [_dep("m", upstreams["slow"], timeout_s=0.3)]
    gw = start_gateway(policy_kit.write(policy_toml(deployments=deps)))
    with _client(gw) as c, pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="m", messages=MSG)
    assert e.value.status_code == 504 and e.value.code == "upstream_timeout"


def test_missing_upstream_secret_is_a_clear_error(
    policy_kit: PolicyKit, start_gateway, upstreams
) -> None:  # noqa: ANN001
    deps = [_dep("m", upstreams["ok"], api_key_env="VEIL_TEST_UNSET_SECRET")]
    gw = start_gateway(policy_kit.write(policy_toml(deployments=deps)))
    with _client(gw) as c, pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="m", messages=MSG)
    assert e.value.status_code == 503 and "VEIL_TEST_UNSET_SECRET is not set" in e.value.message


def test_client_disconnect_mid_stream_cancels_the_upstream(
    policy_kit: PolicyKit,
    start_gateway,
    upstreams,  # noqa: ANN001
) -> None:
    dribble = upstreams["dribble"]
    gw = start_gateway(policy_kit.write(policy_toml(deployments=[_dep("m", dribble)])))
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": " ".join(["word"] * 50)}],
    }
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {TEST_KEY}"},
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # the client is gone after one chunk; the upstream stream must be aborted
    deadline = time.monotonic() + 5
    while _stats(dribble)["streams_aborted"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stats(dribble)["streams_aborted"] == 1
    assert _stats(dribble)["streams_completed"] == 0
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'veil_requests_total{endpoint="chat",model="m",status="499"} 1.0' in metrics


def test_error_mid_stream_reaches_the_sdk_as_an_error(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    from typing import Any

    from veil import Call, hookimpl

    class Breaker:
        name = "breaker"

        def wrap_stream(self, call: Call, chunks: Any) -> Any:
            async def gen() -> Any:
                n = 0
                async for c in chunks:
                    n += 1
                    if n == 3:
                        raise RuntimeError("boom")
                    yield c

            return gen()

    class Impl:
        @hookimpl
        def veil_register_stages(self, register: Any) -> None:
            register(Breaker())

    gw = start_gateway(policy_kit.write(policy_toml(pipeline=["breaker"])), {"breaker": Impl()})
    with _client(gw) as c, pytest.raises(openai.APIError) as e:
        list(c.chat.completions.create(model="mock-model", messages=MSG, stream=True))
    assert "breaker" in e.value.message
