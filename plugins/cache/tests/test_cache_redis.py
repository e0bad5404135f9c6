"""The Redis store: replicas share hits; Redis holds only ciphertext."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from cachetest import admin, ask, ask_stream, upstream_requests
from veil_cache.seal import SealBroken, Sealer

from veil import PluginError
from veil.gateway import Gateway
from veil.testing import OTHER_KEY, PolicyKit, RedisServer, ServerThread

Start = Callable[..., ServerThread]
Q = "Which form do I need to file for a change of address at the registry?"


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def shared_redis(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> tuple[RedisServer, str]:
    redis_server.command("FLUSHALL")
    key = new_key()
    monkeypatch.setenv("VEIL_CACHE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("VEIL_CACHE_KEY", key)
    return redis_server, key


def raw_values(server: RedisServer) -> dict[bytes, bytes]:
    r = redis.Redis.from_url(server.url)
    try:
        out = {}
        for name in r.scan_iter(match="veil-cache:*"):
            if r.type(name) == b"string":
                out[name] = r.get(name)
            elif r.type(name) == b"list":
                for i, v in enumerate(r.lrange(name, 0, -1)):
                    out[name + b"#%d" % i] = v
        return out
    finally:
        r.close()


def test_two_gateways_share_hits_through_redis(
    cache_gateway: Start, mock_upstream: ServerThread, shared_redis: tuple[RedisServer, str]
) -> None:
    one = cache_gateway(store="redis")
    two = cache_gateway(replica=True)
    assert one.gateway.runtime is not two.gateway.runtime
    assert ask(one, Q)[0] == "miss"
    header, answer = ask(two, Q)
    assert header == "hit"
    assert ask(two, Q, key=OTHER_KEY)[0] == "miss"  # teams stay apart in Redis too
    h, text, _ = ask_stream(one, Q, key=OTHER_KEY)
    assert h == "hit" and text == answer.choices[0].message.content
    assert upstream_requests(mock_upstream) == 2
    stats = admin(one, "GET").json()
    assert stats["store"] == "redis" and stats["entries"] == 2
    shared = stats["shared"]
    assert shared["hits"] >= 1 and shared["misses"] >= 1  # counters from both replicas
    assert admin(two, "DELETE", team="other").json()["deleted"] == 1
    assert ask(one, Q, key=OTHER_KEY)[0] == "miss"
    assert admin(one, "DELETE").json()["deleted"] == 2
    assert ask(two, Q)[0] == "miss"


def test_redis_holds_only_ciphertext_that_no_other_key_opens(
    cache_gateway: Start, shared_redis: tuple[RedisServer, str]
) -> None:
    server, key = shared_redis
    gw = cache_gateway(store="redis")
    _, answer = ask(gw, Q)
    content = answer.choices[0].message.content
    values = raw_values(server)
    entries = {k: v for k, v in values.items() if b":e:" in k}
    assert len(entries) == 1
    for name, value in values.items():
        for clear in (b"registry", b"address", content.encode()[:20], b"chat.completion"):
            assert clear not in value and clear not in name
        assert b"test" not in name  # team ids are hashed in key names
    ((name, value),) = entries.items()
    with pytest.raises(SealBroken):
        Sealer(secrets.token_bytes(32)).open(name, value)
    assert b"registry" in Sealer(base64.b64decode(key)).open(name, value)
    # an entry moved under another key name does not open either
    with pytest.raises(SealBroken):
        Sealer(base64.b64decode(key)).open(name + b"x", value)


def _start_error(cache_gateway: Start, policy_kit: PolicyKit) -> str:
    """Start a gateway on the last policy in this process; the PluginError it raises."""
    path, modules = cache_gateway.last[-1]  # type: ignore[attr-defined]
    gateway = Gateway(policy_kit.config(path, extra_plugins=modules))

    async def start() -> None:
        try:
            await gateway.start()
        finally:
            await gateway.stop()

    with pytest.raises(PluginError) as e:
        asyncio.run(start())
    return str(e.value)


def test_the_redis_store_refuses_to_start_without_its_key_or_with_another(
    cache_gateway: Start,
    shared_redis: tuple[RedisServer, str],
    monkeypatch: pytest.MonkeyPatch,
    policy_kit: PolicyKit,
) -> None:
    cache_gateway(store="redis")  # writes the key check
    monkeypatch.setenv("VEIL_CACHE_KEY", new_key())
    assert "sealed with another key" in _start_error(cache_gateway, policy_kit)
    monkeypatch.delenv("VEIL_CACHE_KEY")
    assert "VEIL_CACHE_KEY" in _start_error(cache_gateway, policy_kit)
    monkeypatch.setenv("VEIL_CACHE_KEY", "too-short")
    assert "32 bytes" in _start_error(cache_gateway, policy_kit)


def test_a_redis_outage_serves_calls_uncached(
    cache_gateway: Start,
    mock_upstream: ServerThread,
    monkeypatch: pytest.MonkeyPatch,
    shared_redis: tuple[RedisServer, str],
) -> None:
    from cachetest import cache_stage

    doomed = RedisServer().wait_ready()  # a Redis of its own, stopped under the gateway
    try:
        monkeypatch.setenv("VEIL_CACHE_REDIS_URL", doomed.url)
        gw = cache_gateway(store="redis")
    finally:
        doomed.stop()
    assert ask(gw, Q)[0] == "bypass"
    assert ask(gw, Q)[0] == "bypass"
    assert upstream_requests(mock_upstream) == 2
    assert cache_stage(gw).counters["store_errors"] == 2


def test_two_veil_serve_processes_share_hits(
    policy_kit: PolicyKit,
    mock_upstream: ServerThread,
    shared_redis: tuple[RedisServer, str],
    tmp_path: Path,
) -> None:
    """The installed distribution, loaded from its entry point by two `veil serve`
    processes on one signed policy and one Redis."""
    import os

    from cachetest import deployments, render

    from veil.testing import GatewayProcess, policy_toml

    server, key = shared_redis
    text = policy_toml(
        pipeline=["cache"],
        plugins={"cache": {"distribution": "veil-cache", "version": ">=0.1,<0.2"}},
        deployments=deployments(mock_upstream.url),
    ) + render("cache", {"store": "redis"})
    path = policy_kit.write(text)
    env = {"VEIL_CACHE_REDIS_URL": server.url, "VEIL_CACHE_KEY": key}
    assert os.environ["VEIL_CACHE_KEY"] == key
    with (
        GatewayProcess(path, policy_kit.public_key_path, state_dir=tmp_path / "a", env=env) as a,
        GatewayProcess(path, policy_kit.public_key_path, state_dir=tmp_path / "b", env=env) as b,
    ):
        assert ask(a, Q)[0] == "miss"  # type: ignore[arg-type]
        assert ask(b, Q)[0] == "hit"  # type: ignore[arg-type]
        assert ask_stream(a, Q)[0] == "hit"  # type: ignore[arg-type]
    assert upstream_requests(mock_upstream) == 1
