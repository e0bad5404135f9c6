"""Failover down the route's chain on each failure kind (429, 5xx, timeouts,
connection errors), injected with the mock upstream, for plain and streaming
calls; a request's own 400 and a half-sent stream are never retried elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
from routingtest import HalfStream, chat, client, dead_url, http_dep, mock_server

from veil.testing import ServerThread

Gateway = Callable[..., ServerThread]


def _chain(primary_url: str, backup_url: str, **primary: Any) -> list[dict[str, Any]]:
    return [http_dep("primary", primary_url, **primary), http_dep("backup", backup_url)]


ALIAS = {"aliases": {"chain": {"targets": ["primary", "backup"]}}, "breaker": {"enabled": False}}


@pytest.mark.parametrize("status", [429, 500, 502, 503])
@pytest.mark.parametrize("stream", [False, True])
def test_failover_on_upstream_status(routing_gateway: Gateway, status: int, stream: bool) -> None:
    with mock_server(fail_rate=1.0, fail_status=status) as bad, mock_server() as good:
        gw = routing_gateway(_chain(bad.url, good.url), ALIAS)
        if stream:
            with client(gw).chat.completions.with_streaming_response.create(
                model="chain", messages=[{"role": "user", "content": "hi"}], stream=True
            ) as resp:
                assert resp.headers["x-veil-model"] == "backup"
                text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
            assert text.endswith("You said: hi")
        else:
            answer, headers = chat(gw, "chain")
            assert answer.model == "up-backup"
            assert headers["x-veil-model"] == "backup"
        assert bad.app.settings.stats["failed"] == 1
        assert good.app.settings.stats["requests"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_failover_on_timeout(routing_gateway: Gateway, stream: bool) -> None:
    with mock_server(latency_ms=3000) as slow, mock_server() as good:
        gw = routing_gateway(_chain(slow.url, good.url, timeout_s=0.3), ALIAS)
        if stream:
            chunks = list(
                client(gw).chat.completions.create(
                    model="chain", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            )
            assert chunks[0].model == "up-backup"
        else:
            assert chat(gw, "chain")[0].model == "up-backup"
        assert good.app.settings.stats["requests"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_failover_on_connection_refused(routing_gateway: Gateway, stream: bool) -> None:
    with mock_server() as good:
        gw = routing_gateway(_chain(dead_url(), good.url), ALIAS)
        if stream:
            chunks = list(
                client(gw).chat.completions.create(
                    model="chain", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            )
            assert chunks[0].model == "up-backup"
        else:
            assert chat(gw, "chain")[0].model == "up-backup"


def test_every_deployment_failing_is_a_5xx_in_openai_shape(routing_gateway: Gateway) -> None:
    with mock_server(fail_rate=1.0, fail_status=503) as bad:
        gw = routing_gateway(_chain(bad.url, dead_url()), ALIAS)
        with pytest.raises(openai.InternalServerError) as e:
            chat(gw, "chain")
        assert e.value.status_code in (502, 503)
        assert bad.app.settings.stats["failed"] == 1


def test_a_request_the_upstream_rejects_is_not_sent_elsewhere(routing_gateway: Gateway) -> None:
    with mock_server(fail_rate=1.0, fail_status=400) as bad, mock_server() as good:
        gw = routing_gateway(_chain(bad.url, good.url), ALIAS)
        with pytest.raises(openai.BadRequestError):
            chat(gw, "chain")
        assert good.app.settings.stats["requests"] == 0


def test_a_half_sent_stream_is_never_retried(routing_gateway: Gateway) -> None:
    half = HalfStream()
    with ServerThread(half) as broken, mock_server() as good:
        gw = routing_gateway(_chain(broken.url, good.url), ALIAS)
        text = []
        with pytest.raises(openai.APIError):
            for chunk in client(gw).chat.completions.create(
                model="chain", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                text += [c.delta.content or "" for c in chunk.choices]
        assert text == ["Hel"]
        assert half.requests == 1
        assert good.app.settings.stats["requests"] == 0
