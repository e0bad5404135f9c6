"""Fixtures for veil-audit's tests: real gateways with the ``audit`` stage
(and, where a test says so, the real ``pii`` and ``budget`` plugins or a
test-only ``cache`` stage) in front of ``veil mock-upstream``, driven by the
official ``openai`` SDK. ``policy_kit``, ``start_gateway`` and
``mock_upstream`` come from :mod:`veil.testing`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from veil.testing import PolicyKit, ServerThread, policy_toml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audittest import KEY, AuditGateway, section, upstream  # noqa: E402


@pytest.fixture(autouse=True)
def audit_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The HMAC key, in the environment as the gateway expects it."""
    monkeypatch.setenv("VEIL_AUDIT_HMAC_KEY", KEY)
    return KEY


@pytest.fixture
def audit_gateway(
    policy_kit: PolicyKit,
    start_gateway: Callable[..., ServerThread],
    mock_upstream: ServerThread,
    tmp_path: Path,
) -> Iterator[Callable[..., AuditGateway]]:
    """``audit_gateway(pipeline=[...], plugins={...}, sections={...}, **audit)``:
    a gateway whose pipeline ends with ``audit`` (settings ``audit``), in
    front of the mock upstream unless ``deployments`` is given."""
    count = iter(range(1, 1000))

    def start(
        pipeline: list[str] | None = None,
        plugins: dict[str, Any] | None = None,
        sections: dict[str, dict[str, Any]] | None = None,
        deployments: list[dict[str, Any]] | None = None,
        entries: dict[str, dict[str, Any]] | None = None,
        **audit: Any,
    ) -> AuditGateway:
        n = next(count)
        directory = tmp_path / f"audit-{n}"
        audit.setdefault("path", str(directory))
        names = [*(pipeline or []), "audit"]
        text = policy_toml(
            version=n,
            pipeline=names,
            plugins={name: (entries or {}).get(name, {}) for name in names},
            deployments=deployments or [upstream(mock_upstream.url)],
            gateway={"default_stage_timeout_ms": 30000},
        )
        for name, values in {**(sections or {}), "audit": audit}.items():
            text += section(name, values)
        import veil_audit

        server = start_gateway(
            policy_kit.write(text, f"gateway-{n}.toml"),
            plugins={"audit": veil_audit, **(plugins or {})},
        )
        return AuditGateway(server, directory)

    yield start
