"""Fixtures for veil-cache's tests: real gateways with the ``cache`` stage (and,
where a test says so, ``pii``, ``budget`` and ``audit``) in front of ``veil
mock-upstream``, driven by the official ``openai`` SDK. ``policy_kit``,
``start_gateway``, ``mock_upstream`` and ``redis_server`` come from
:mod:`veil.testing`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from veil.testing import PolicyKit, ServerThread, policy_toml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import veil_cache  # noqa: E402
from cachetest import deployments, render  # noqa: E402


@pytest.fixture
def cache_gateway(
    policy_kit: PolicyKit, start_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> Callable[..., ServerThread]:
    """``cache_gateway(pipeline=[...], plugins={...}, sections={...}, **cache)``: a
    started gateway running ``cache`` (and the other named plugins) with that
    ``[cache]`` section, in front of the mock upstream. ``replica=True``: one
    more gateway (its own runtime and store) on the last policy written."""
    versions = iter(range(1, 1000))
    last: list[tuple[Any, dict[str, Any]]] = []

    def start(
        pipeline: list[str] | None = None,
        plugins: dict[str, Any] | None = None,
        sections: dict[str, dict[str, Any]] | None = None,
        replica: bool = False,
        **cache: Any,
    ) -> ServerThread:
        if replica:  # another gateway process on the same signed policy
            path, modules = last[-1]
            return start_gateway(path, plugins=modules)
        pipeline = pipeline or ["cache"]
        modules: dict[str, Any] = {"cache": veil_cache, **(plugins or {})}
        text = policy_toml(
            version=next(versions),
            pipeline=pipeline,
            deployments=deployments(mock_upstream.url),
        )
        for name, section in {**(sections or {}), "cache": cache}.items():
            text += render(name, section)
        path = policy_kit.write(text, f"gateway-{next(versions)}.toml")
        last.append((path, modules))
        return start_gateway(path, plugins=modules)

    start.last = last  # type: ignore[attr-defined]
    return start
