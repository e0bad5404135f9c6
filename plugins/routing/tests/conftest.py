"""Fixtures for veil-routing's tests: real gateways running the ``routing``
stage, driven by the official ``openai`` SDK; upstreams are the core's mock
(in-process ``mock`` provider, or ``veil mock-upstream`` servers with failure
injection). ``policy_kit`` and ``start_gateway`` come from :mod:`veil.testing`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import veil_routing

from veil.testing import PolicyKit, ServerThread

sys.path.insert(0, str(Path(__file__).resolve().parent))

from routingtest import Recorder, close_clients, routing_policy  # noqa: E402


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close the ``openai`` clients a test opened (no socket left to the GC)."""
    yield
    close_clients()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def routing_gateway(
    policy_kit: PolicyKit, start_gateway: Callable[..., ServerThread], recorder: Recorder
) -> Callable[..., ServerThread]:
    """``routing_gateway(deployments, routing_section, extra="")``: a started
    gateway (in this process) running ``routing`` then the recorder."""
    count = iter(range(1, 1000))

    def start(
        deployments: Sequence[Mapping[str, Any]], routing: Mapping[str, Any], **kw: Any
    ) -> ServerThread:
        n = next(count)
        path = policy_kit.write(
            routing_policy(deployments, routing, version=n, **kw), f"gateway-{n}.toml"
        )
        return start_gateway(path, plugins={"routing": veil_routing, "recorder": recorder})

    return start
