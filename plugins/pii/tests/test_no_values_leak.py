"""No personal value ever appears in logs, metrics, errors or audit data.

A recording plugin placed before ``pii`` in the pipeline captures what an
audit plugin would see (``call.decisions``, ``call.scratch``, the error);
the gateway's logs are captured from the process's stdout and stderr, and
``/metrics`` is read at the end. Then every labelled value is searched for.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest
from piitest import PiiGateway, upstream_deployments

from veil import Call, GatewayError, hookimpl
from veil.testing import ADMIN_KEY, TEST_KEY, policy_toml

CARD = "Pay with 4111 1111 1111 1111 for Zoe Young."


class AuditRecorder:
    """Sees calls as an audit plugin would, after pii (response and error hooks)."""

    name = "recorder"

    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen

    def _record(self, call: Call, error: GatewayError | None = None) -> None:
        self.seen.append(
            {
                "decisions": [
                    {"stage": d.stage, "action": d.action, "detail": dict(d.detail)}
                    for d in call.decisions
                ],
                "scratch": {k: v for k, v in call.scratch.items()},
                "error": None if error is None else error.body(),
            }
        )

    async def on_response(self, call: Call) -> None:
        self._record(call)

    async def on_error(self, call: Call, error: GatewayError) -> None:
        self._record(call, error)


class RecorderPlugin:
    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen

    @hookimpl
    def veil_register_stages(self, register: Any, settings: Any) -> None:
        register(AuditRecorder(self.seen))


def _values(records: list[dict[str, Any]]) -> set[str]:
    """Labelled values long enough to search for without chance matches."""
    found = {"Zoe Young", "4111 1111 1111 1111"}
    for record in records:
        for span in record["spans"]:
            value = record["text"][span["start"] : span["end"]].strip()
            if len(value) >= 5 and re.search(r"[^\W\d_]{3}|\d{6}", value):
                found.add(value)
    return found


def test_no_value_in_logs_metrics_errors_or_audit(
    policy_kit, start_gateway, mock_upstream, records, capfd: pytest.CaptureFixture[str]
) -> None:
    seen: list[Any] = []
    text = policy_toml(
        pipeline=["recorder", "pii"],
        plugins={"recorder": {}, "pii": {}},
        sections={"pii": {"actions": {"CREDIT_CARD": "block"}}},
        deployments=upstream_deployments(mock_upstream.url),
        gateway={"default_stage_timeout_ms": 10000},
    )
    gateway = start_gateway(policy_kit.write(text), {"recorder": RecorderPlugin(seen)})
    gw = PiiGateway(gateway, mock_upstream)
    errors: list[Any] = []
    subset = records[:120]
    with gw.client() as client:
        for i, record in enumerate(subset):
            messages = [{"role": "user", "content": record["text"]}]
            try:
                if i % 3 == 0:
                    for _ in client.chat.completions.create(
                        model="mock-model", messages=messages, stream=True
                    ):
                        pass
                else:
                    client.chat.completions.create(model="mock-model", messages=messages)
            except openai.APIStatusError as e:
                errors.append(e.body)
        with pytest.raises(openai.BadRequestError) as blocked:
            client.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": CARD}]
            )
        errors.append(blocked.value.body)
    with gw.client(default_headers={"x-veil-conversation": "Zoe Young"}) as client:
        with pytest.raises(openai.BadRequestError) as bad:  # not a valid id: has a space
            client.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": "hi"}]
            )
        errors.append(bad.value.body)
    metrics = httpx.get(
        gw.gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    ).text
    out, err = capfd.readouterr()
    haystacks = {
        "logs": out + err,
        "metrics": metrics,
        "errors": json.dumps(errors, ensure_ascii=False),
        "audit": json.dumps(seen, ensure_ascii=False, default=repr),
    }
    assert len(seen) >= len(subset) + 1
    assert any(s["scratch"].get("pii", {}).get("entities") for s in seen)
    values = _values(subset) | {"Zoe Young"}
    for where, haystack in haystacks.items():
        leaked = sorted(v for v in values if v in haystack)
        assert not leaked, f"personal values in {where}: {leaked[:5]}"
    assert TEST_KEY not in haystacks["logs"]
