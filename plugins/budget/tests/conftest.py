"""Fixtures for veil-budget's tests: real gateways with the ``budget`` stage in
front of ``veil mock-upstream`` (fixed usage, so costs are known), driven by
the official ``openai`` SDK. ``policy_kit``, ``start_gateway``,
``mock_upstream`` and ``redis_server`` come from :mod:`veil.testing`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import veil_budget

from veil.testing import PolicyKit, RedisServer, ServerThread, policy_toml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from budgettest import deployments  # noqa: E402


@pytest.fixture
def budget_policy(
    policy_kit: PolicyKit, mock_upstream: ServerThread, tmp_path: Path
) -> Callable[..., Path]:
    """``budget_policy(plugin={...}, **section)``: a signed policy running
    ``budget`` with that ``[budget]`` section, in front of the mock upstream."""

    versions = iter(range(1, 1000))

    def write(
        plugin: dict[str, Any] | None = None, name: str = "gateway.toml", **section: Any
    ) -> Path:
        section.setdefault("sqlite_path", str(tmp_path / f"{name}.sqlite3"))
        text = policy_toml(
            version=next(versions),  # each policy of a test is new to the rollback guard
            pipeline=["budget"],
            plugins={"budget": plugin or {}},
            deployments=deployments(mock_upstream.url),
        )
        return policy_kit.write(text + render_section(section), name)

    return write


def render_section(section: dict[str, Any]) -> str:
    """``[budget]`` with its ``[[budget.budgets]]`` and ``[[budget.rate_limits]]`` tables."""
    from veil.testing import _toml_value

    lines = ["", "[budget]"]
    tables = {k: section.pop(k) for k in ("budgets", "rate_limits") if k in section}
    lines += [f"{k} = {_toml_value(v)}" for k, v in section.items()]
    for name, rules in tables.items():
        for rule in rules:
            lines += ["", f"[[budget.{name}]]"] + [
                f"{k} = {_toml_value(v)}" for k, v in rule.items()
            ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def budget_gateway(
    budget_policy: Callable[..., Path], start_gateway: Callable[..., ServerThread]
) -> Callable[..., ServerThread]:
    """``budget_gateway(**section)``: a started gateway (in this process)."""

    count = iter(range(1000))

    def start(plugin: dict[str, Any] | None = None, **section: Any) -> ServerThread:
        path = budget_policy(plugin, f"gateway-{next(count)}.toml", **section)
        return start_gateway(path, plugins={"budget": veil_budget})

    return start


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    """The URL of the tests' ``redis-server``, flushed (for the store-level tests)."""
    redis_server.command("FLUSHALL")
    return redis_server.url
