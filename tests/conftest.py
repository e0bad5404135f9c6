"""Fixtures for the assembled gateway: real servers on 127.0.0.1, driven by
the official ``openai`` SDK. (``policy_kit``, ``start_gateway`` and
``mock_upstream`` come from :mod:`veil.testing`.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from veil.testing import TEST_KEY, PolicyKit, ServerThread, policy_toml


@pytest.fixture
def gateway(policy_kit: PolicyKit, start_gateway) -> ServerThread:  # noqa: ANN001
    """The core gateway with the default test policy (mock deployments)."""
    return start_gateway(policy_kit.write(policy_toml()))


@pytest.fixture
def upstream_gateway(policy_kit: PolicyKit, start_gateway, mock_upstream) -> ServerThread:  # noqa: ANN001
    """The core gateway in front of ``veil mock-upstream`` over HTTP (provider ``openai``)."""
    deployments = [
        {
            "name": "mock-model",
            "provider": "openai",
            "model": "upstream-1",
            "api_base": mock_upstream.url + "/v1",
            "max_retries": 0,
            "input_per_mtok": 1.0,
            "output_per_mtok": 2.0,
        },
        {
            "name": "mock-embed",
            "provider": "openai",
            "model": "upstream-embed",
            "api_base": mock_upstream.url + "/v1",
        },
    ]
    return start_gateway(policy_kit.write(policy_toml(deployments=deployments)))


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0) as c:
        yield c


@pytest.fixture(params=["mock", "openai"], ids=["in-process-mock", "http-upstream"])
def any_gateway(request: pytest.FixtureRequest) -> ServerThread:
    """Both provider paths: the built-in mock, and the OpenAI adapter over HTTP."""
    name = "gateway" if request.param == "mock" else "upstream_gateway"
    return request.getfixturevalue(name)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
