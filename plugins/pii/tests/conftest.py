"""Fixtures for veil-pii's tests: a real gateway with the ``pii`` stage in
front of ``veil mock-upstream`` (which records every body it receives),
driven by the official ``openai`` SDK. ``policy_kit``, ``start_gateway``,
``mock_upstream`` and ``redis_server`` come from :mod:`veil.testing`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from veil.testing import PolicyKit, ServerThread, policy_toml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from piitest import PiiGateway, labelled_data, upstream_deployments  # noqa: E402


@pytest.fixture
def pii_gateway(
    policy_kit: PolicyKit, start_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> Callable[..., PiiGateway]:
    """``pii_gateway(**pii_section)``: a gateway running ``pii`` with that section."""

    def start(plugins: dict[str, Any] | None = None, **section: Any) -> PiiGateway:
        text = policy_toml(
            pipeline=["pii"],
            plugins={"pii": plugins or {}},
            sections={"pii": section} if section else None,
            deployments=upstream_deployments(mock_upstream.url),
        )
        return PiiGateway(start_gateway(policy_kit.write(text)), mock_upstream)

    return start


@pytest.fixture
def records() -> Iterator[list[dict[str, Any]]]:
    with labelled_data().open(encoding="utf-8") as lines:
        yield [json.loads(line) for line in lines if line.strip()]
