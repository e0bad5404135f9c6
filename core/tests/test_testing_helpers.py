"""The helpers veil.testing gives plugin authors work as documented."""

from __future__ import annotations

import httpx

from veil.testing import TEST_KEY, RedisServer, ServerThread, policy_toml


def test_redis_server_fixture_is_a_real_server(redis_server: RedisServer) -> None:
    assert redis_server.command("PING").startswith(b"+PONG")
    assert redis_server.command("SET", "veil:k", "v") == b"+OK\r\n"
    assert redis_server.command("GET", "veil:k") == b"$1\r\nv\r\n"
    assert redis_server.url.startswith("redis://127.0.0.1:")


def test_mock_upstream_fixture_answers_and_counts(mock_upstream: ServerThread) -> None:
    r = httpx.post(
        mock_upstream.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.json()["choices"][0]["message"]["content"].endswith("You said: hi")
    assert mock_upstream.app.settings.stats["requests"] == 1


def test_policy_toml_defaults_are_a_valid_signed_policy(policy_kit, start_gateway) -> None:  # noqa: ANN001
    gw = start_gateway(policy_kit.write(policy_toml()))
    r = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {TEST_KEY}"})
    assert r.status_code == 200
