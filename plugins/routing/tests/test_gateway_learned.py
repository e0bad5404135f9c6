"""Pool strategies end to end: a router trained with ``veil_routing.learned``,
pinned by SHA-256 in the signed policy, serving calls through the real gateway;
a swapped or tampered artifact stops start-up.

These tests need ``veil_routing.learned`` (built on its own branch); they are
skipped, saying so, only when it cannot be imported."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from routingtest import chat, mock_dep, routing_policy, start_error

from veil.errors import PluginError
from veil.testing import PolicyKit, ServerThread

learned: Any = pytest.importorskip(
    "veil_routing.learned", reason="veil_routing.learned (the ML branch) is not installed"
)

Gateway = Callable[..., ServerThread]

HARD = ["prove that", "derive the", "show formally why", "compute the integral of"]
EASY = ["say hello to", "what colour is", "translate 'thanks' for", "name a fruit like"]
TOPICS = ["the sky", "a prime number", "my friend", "the ocean", "a matrix", "bread", "rust"]


def _rows(n: int = 240, seed: int = 7) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        hard = i % 2 == 0
        prompt = f"{rnd.choice(HARD if hard else EASY)} {rnd.choice(TOPICS)} ({i})"
        rows.append({"prompt": prompt, "scores": {"strong": 1.0, "weak": 0.0 if hard else 1.0}})
    return rows


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("router") / "router.veilrouter"
    sha = learned.train(_rows()).save(path)
    return path, sha


DEPS = [
    mock_dep("big", "up-big", input_per_mtok=10.0, output_per_mtok=30.0),
    mock_dep("small", "up-small", input_per_mtok=0.2, output_per_mtok=0.6),
]


def _section(path: Path, sha: str, **kw: Any) -> dict[str, Any]:
    return {
        "router": {
            "artifact": str(path),
            "sha256": sha,
            "models": {"big": "strong", "small": "weak"},
        },
        "pools": {"auto": {"models": ["big", "small"]}},
        **kw,
    }


def test_strategy_request_through_the_gateway(
    routing_gateway: Gateway, artifact: tuple[Path, str]
) -> None:
    gw = routing_gateway(DEPS, _section(*artifact))
    cost = {"x-veil-route-strategy": "cost"}
    answer, headers = chat(gw, "auto", "say hello to the ocean", headers=cost)
    assert answer.model == "up-small"
    assert headers["x-veil-model"] == "small"
    assert headers["x-veil-route"].startswith("pool=auto; strategy=cost; model=small;")
    quality = {"x-veil-route-strategy": "quality"}
    answer, headers = chat(gw, "auto", "prove that a prime number is odd", headers=quality)
    assert answer.model == "up-big"
    assert headers["x-veil-route"].startswith("pool=auto; strategy=quality; model=big;")
    # without a header: the policy's default strategy
    _, headers = chat(gw, "auto", "prove that a prime number is odd")
    assert headers["x-veil-route"].startswith("pool=auto; strategy=balanced; model=big;")


def test_relative_artifact_path_is_read_next_to_the_policy(
    policy_kit: PolicyKit, start_gateway: Gateway, artifact: tuple[Path, str]
) -> None:
    import veil_routing

    path, sha = artifact
    (policy_kit.root / "routers").mkdir(exist_ok=True)
    (policy_kit.root / "routers" / "r.veilrouter").write_bytes(path.read_bytes())
    policy = policy_kit.write(
        routing_policy(DEPS, _section(Path("routers/r.veilrouter"), sha), pipeline=["routing"])
    )
    gw = start_gateway(policy, plugins={"routing": veil_routing})
    cost = {"x-veil-route-strategy": "cost"}
    assert chat(gw, "auto", "name a fruit like bread", headers=cost)[0].model == "up-small"


def test_tampered_artifact_is_refused_at_start_up(
    policy_kit: PolicyKit, artifact: tuple[Path, str], tmp_path: Path
) -> None:
    import veil_routing

    path, sha = artifact
    tampered = tmp_path / "tampered.veilrouter"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    policy = policy_kit.write(routing_policy(DEPS, _section(tampered, sha), pipeline=["routing"]))
    error = start_error(policy_kit, policy, {"routing": veil_routing})
    assert isinstance(error, PluginError)
    assert "refused" in str(error) and sha[:12] in str(error)


def test_swapped_artifact_is_refused_at_start_up(
    policy_kit: PolicyKit, artifact: tuple[Path, str], tmp_path: Path
) -> None:
    import veil_routing

    _, sha = artifact
    other = tmp_path / "other.veilrouter"
    learned.train(_rows(seed=99)).save(other)
    policy = policy_kit.write(routing_policy(DEPS, _section(other, sha), pipeline=["routing"]))
    error = start_error(policy_kit, policy, {"routing": veil_routing})
    assert isinstance(error, PluginError) and "refused" in str(error)


def test_missing_artifact_is_refused_at_start_up(
    policy_kit: PolicyKit, artifact: tuple[Path, str], tmp_path: Path
) -> None:
    import veil_routing

    _, sha = artifact
    policy = policy_kit.write(
        routing_policy(DEPS, _section(tmp_path / "nope.veilrouter", sha), pipeline=["routing"])
    )
    error = start_error(policy_kit, policy, {"routing": veil_routing})
    assert isinstance(error, PluginError) and "nope.veilrouter" in str(error)


def test_output_budget_through_the_gateway(
    routing_gateway: Gateway, artifact: tuple[Path, str], recorder: Any
) -> None:
    gw = routing_gateway(DEPS, _section(*artifact, output_budget={"enabled": True}))
    chat(gw, "auto", "say hello to my friend")
    [decision] = recorder.routing_decisions()
    assert decision["max_output_tokens"] >= 64
