"""``POST /v1/feedback`` end to end: the caller's key scores its own call, the
score reaches the feedback store, and it persists across a gateway restart.

Needs ``veil_routing.learned`` and ``veil_routing.feedback`` (built on their
own branch); skipped, saying so, only when they cannot be imported. The
request validation tests below run without them."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from routingtest import chat, mock_dep

from veil.testing import OTHER_KEY, TEST_KEY, PolicyKit, ServerThread

Gateway = Callable[..., ServerThread]

HAVE_ML = all(
    importlib.util.find_spec(m) is not None
    for m in ("veil_routing.learned", "veil_routing.feedback")
)
needs_ml = pytest.mark.skipif(
    not HAVE_ML, reason="veil_routing.learned / .feedback (the ML branch) are not installed"
)

DEPS = [
    mock_dep("big", "up-big", input_per_mtok=10.0, output_per_mtok=30.0),
    mock_dep("small", "up-small", input_per_mtok=0.2, output_per_mtok=0.6),
]


def _post(gw: ServerThread, body: Any, key: str | None = TEST_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gw.url + "/v1/feedback", json=body, headers=headers)


def test_feedback_is_off_by_default(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {})
    r = _post(gw, {"request_id": "x", "score": 1})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "feedback_disabled"


def test_feedback_needs_an_api_key(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {})
    r = _post(gw, {"request_id": "x", "score": 1}, key=None)
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def _router(tmp: Path) -> tuple[Path, str]:
    learned = importlib.import_module("veil_routing.learned")
    rows = []
    for i in range(120):
        hard = i % 2 == 0
        prompt = ("prove the theorem" if hard else "say hello") + f" number {i}"
        rows.append({"prompt": prompt, "scores": {"strong": 1.0, "weak": 0.0 if hard else 1.0}})
    path = tmp / "router.veilrouter"
    sha = learned.train(rows).save(path)
    return path, sha


def _section(path: Path, sha: str) -> dict[str, Any]:
    return {
        "router": {
            "artifact": str(path),
            "sha256": sha,
            "models": {"big": "strong", "small": "weak"},
        },
        "pools": {"auto": {"models": ["big", "small"]}},
        "feedback": {"enabled": True},
    }


@needs_ml
@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"request_id": "x"}, "invalid_score"),
        ({"request_id": "x", "score": 1.5}, "invalid_score"),
        ({"request_id": "x", "score": True}, "invalid_score"),
        ({"score": 0.5}, "invalid_request_id"),
        ([1, 2], "invalid_type"),
    ],
)
def test_bad_feedback_is_a_400(
    routing_gateway: Gateway, tmp_path: Path, body: Any, code: str
) -> None:
    gw = routing_gateway(DEPS, _section(*_router(tmp_path)))
    r = _post(gw, body)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == code


@needs_ml
def test_feedback_persists_across_a_restart(
    policy_kit: PolicyKit, start_gateway: Gateway, tmp_path: Path
) -> None:
    import veil_routing
    from routingtest import routing_policy

    section = _section(*_router(tmp_path))
    policy = policy_kit.write(routing_policy(DEPS, section, pipeline=["routing"]))
    gw = start_gateway(policy, plugins={"routing": veil_routing})
    cost = {"x-veil-route-strategy": "cost"}
    answer, headers = chat(gw, "auto", "say hello please", headers=cost)
    assert answer.model == "up-small"
    rid = headers["x-request-id"]
    # another key cannot score this call
    r = _post(gw, {"request_id": rid, "score": 0.0}, key=OTHER_KEY)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_request_id"
    for _ in range(30):  # the small model keeps failing this kind of prompt
        _, h = chat(gw, "auto", "say hello please", headers=cost)
        if h["x-veil-model"] != "small":
            break
        r = _post(gw, {"request_id": h["x-request-id"], "score": 0.0})
        assert r.status_code == 200 and r.json()["accepted"] is True
    assert chat(gw, "auto", "say hello please", headers=cost)[1]["x-veil-model"] == "big"
    gw.stop()
    # a new gateway process state: the same state dir, the learned estimates are back
    policy2 = policy_kit.write(
        routing_policy(DEPS, section, pipeline=["routing"], version=2), "gateway-2.toml"
    )
    gw2 = start_gateway(policy2, plugins={"routing": veil_routing})
    assert chat(gw2, "auto", "say hello please", headers=cost)[1]["x-veil-model"] == "big"
