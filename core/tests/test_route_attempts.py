"""The core's per-attempt report to routing stages (``RouteDecision.on_attempt``),
the state directory and policy path handed to plugins, and which route paths a
plugin may register."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from veil import PluginError, hookimpl
from veil.errors import UpstreamError
from veil.mock.server import MockSettings, MockUpstream
from veil.registry import RouteRegistrar
from veil.testing import TEST_KEY, PolicyKit, ServerThread, policy_toml
from veil.types import Call, Deployment

Attempt = tuple[str, str | None]


class Watcher:
    """A plugin whose stage asks the core for per-attempt reports."""

    def __init__(self, raise_in_callback: bool = False) -> None:
        self.attempts: list[Attempt] = []
        self.seconds: list[float] = []
        self.runtime: Any = None
        watcher = self

        class _Stage:
            name = "watcher"

            async def on_request(self, call: Call) -> None:
                assert call.route is not None
                call.route.on_attempt = watcher.report

        self.stage = _Stage()
        self.raise_in_callback = raise_in_callback

    def report(self, dep: Deployment, seconds: float, error: UpstreamError | None) -> None:
        self.attempts.append((dep.model, error.code if error else None))
        self.seconds.append(seconds)
        if self.raise_in_callback:
            raise RuntimeError("a broken callback")

    @hookimpl
    def veil_register_stages(self, register: Any, settings: Any) -> None:
        register(self.stage)

    @hookimpl
    async def veil_startup(self, runtime: Any) -> None:
        self.runtime = runtime


def _policy(failing: str, healthy: str, retries: int = 0) -> str:
    common = {"name": "chain", "provider": "openai", "max_retries": retries}
    return policy_toml(
        pipeline=["watcher"],
        deployments=[
            {**common, "model": "bad", "api_base": failing + "/v1"},
            {**common, "model": "good", "api_base": healthy + "/v1"},
        ],
    )


@pytest.fixture
def failing() -> Any:
    with ServerThread(MockUpstream(MockSettings(fail_rate=1.0, fail_status=503))) as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
def test_each_attempt_is_reported_with_its_outcome(
    policy_kit: PolicyKit,
    start_gateway: Callable[..., ServerThread],
    mock_upstream: ServerThread,
    failing: ServerThread,
    stream: bool,
) -> None:
    watcher = Watcher()
    gw = start_gateway(
        policy_kit.write(_policy(failing.url, mock_upstream.url, retries=1)),
        plugins={"watcher": watcher},
    )
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    if stream:
        chunks = list(client.chat.completions.create(model="chain", messages=messages, stream=True))
        assert chunks[0].model == "good"
    else:
        assert client.chat.completions.create(model="chain", messages=messages).model == "good"
    # one retry on the failing deployment, then the failover
    assert watcher.attempts == [
        ("bad", "upstream_error"),
        ("bad", "upstream_error"),
        ("good", None),
    ]
    assert all(s >= 0 for s in watcher.seconds)


def test_a_callback_that_raises_does_not_break_the_call(
    policy_kit: PolicyKit,
    start_gateway: Callable[..., ServerThread],
    mock_upstream: ServerThread,
    failing: ServerThread,
) -> None:
    watcher = Watcher(raise_in_callback=True)
    gw = start_gateway(
        policy_kit.write(_policy(failing.url, mock_upstream.url)), plugins={"watcher": watcher}
    )
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0)
    answer = client.chat.completions.create(
        model="chain", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.model == "good"
    assert watcher.attempts == [("bad", "upstream_error"), ("good", None)]


def test_plugins_get_the_state_dir_and_policy_path(
    policy_kit: PolicyKit,
    start_gateway: Callable[..., ServerThread],
    mock_upstream: ServerThread,
    failing: ServerThread,
) -> None:
    watcher = Watcher()
    path = policy_kit.write(_policy(failing.url, mock_upstream.url))
    start_gateway(path, plugins={"watcher": watcher})
    assert watcher.runtime.policy_path == path
    assert watcher.runtime.state_dir == policy_kit.state_dir


async def _endpoint(request: Any) -> Any:
    return None


def test_plugins_may_add_v1_routes_but_not_the_cores() -> None:
    register = RouteRegistrar()
    register("/v1/feedback", _endpoint, methods=("POST",))
    assert register.routes[0].path == "/v1/feedback"
    for path in (
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/x",
        "/metrics",
    ):
        with pytest.raises(PluginError, match="reserved by the core"):
            register(path, _endpoint)
