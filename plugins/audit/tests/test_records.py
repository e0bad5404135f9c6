"""Every kind of call yields exactly one record, with every field, written
before the client gets the answer; no text, personal value or key in it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from audittest import FIELDS, AuditGateway, CachePlugin, by_request, calls, upstream

from veil.mock.server import MockUpstream
from veil.testing import ADMIN_KEY, TEST_KEY, ServerThread

QUESTION = "What is the capital of Peru? Answer in one word."


def _one(gw: AuditGateway, request_id: str) -> dict[str, Any]:
    found = by_request(gw.directory).get(request_id, [])
    assert len(found) == 1, f"{len(found)} records for {request_id}"
    record = found[0]
    assert set(record) == FIELDS, set(record) ^ FIELDS
    return record


def _chat(gw: AuditGateway, rid: str, **kw: Any) -> Any:
    with gw.client(default_headers={"x-request-id": rid}) as client:
        kw.setdefault("model", "mock-model")
        kw.setdefault("messages", [{"role": "user", "content": QUESTION}])
        if kw.get("stream"):
            return "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(**kw)
                if c.choices
            )
        return client.chat.completions.create(**kw)


def _metrics(gw: AuditGateway) -> str:
    return httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text


def test_a_served_call_is_recorded_before_its_answer_arrives(
    audit_gateway: Callable[..., AuditGateway], mock_upstream: ServerThread
) -> None:
    mock_upstream.app.settings.usage = {"prompt_tokens": 1000, "completion_tokens": 500}
    gw = audit_gateway()
    answer = _chat(gw, "req-success-1", user="alice@example.com")
    # read at once: the record was in the file before the response was sent
    r = _one(gw, "req-success-1")
    assert answer.choices[0].message.content
    assert r["event"] == "call" and r["kind"] == "chat" and r["stream"] is False
    assert r["status"] == 200 and r["error"] is None
    assert r["principal"]["key_id"] == "test" and r["principal"]["team"] == "test"
    assert r["principal"]["user"].startswith("u-")  # a pseudonym, not the e-mail address
    assert r["model"] == r["deployment"] == "mock-model"
    assert r["provider"] == "openai" and r["upstream_model"] == "upstream-1"
    assert r["route"] == "policy" and r["attempts"] == 1 and r["failovers"] == 0
    assert (r["tokens_in"], r["tokens_out"]) == (1000, 500)
    assert r["cost_usd"] == pytest.approx((1000 * 2.0 + 500 * 8.0) / 1e6)
    assert r["cache"] is None and r["answered_by"] is None and r["budget"] is None
    assert r["policy"]["version"] >= 1 and len(r["policy"]["sha256"]) == 64
    assert r["policy"]["signed_by"] and len(r["policy"]["signed_by"]) == 16
    assert r["plugins"] == {"audit": "0.1.0"}
    lat = r["latency_ms"]
    assert lat["total"] >= lat["upstream"] > 0
    assert lat["gateway"] == pytest.approx(lat["total"] - lat["upstream"], abs=0.01)
    text = (gw.directory / "audit.jsonl").read_text()
    for secret in (QUESTION, "Peru", answer.choices[0].message.content, TEST_KEY, "alice"):
        assert secret not in text
    # the same user gets the same pseudonym
    _chat(gw, "req-success-2", user="alice@example.com")
    assert _one(gw, "req-success-2")["principal"]["user"] == r["principal"]["user"]
    metrics = _metrics(gw)
    assert 'veil_audit_tokens_total{direction="input",model="mock-model",team="test"} 2000.0' in (
        metrics
    )
    assert 'veil_audit_cost_usd_total{model="mock-model",team="test"}' in metrics
    assert 'veil_audit_records_total{result="written"} 2.0' in metrics


def test_a_streamed_call_is_recorded_with_its_usage(
    audit_gateway: Callable[..., AuditGateway], mock_upstream: ServerThread
) -> None:
    mock_upstream.app.settings.chunk_delay_ms = 5
    gw = audit_gateway()
    text = _chat(gw, "req-stream-1", stream=True)
    r = _one(gw, "req-stream-1")
    assert text and r["stream"] is True and r["status"] == 200
    assert r["tokens_out"] > 0 and r["cost_usd"] > 0
    # streaming time is upstream time, not gateway time
    assert r["latency_ms"]["upstream"] > r["latency_ms"]["gateway"]


def test_a_cache_hit_is_recorded_as_answered_by_the_cache(
    audit_gateway: Callable[..., AuditGateway], mock_upstream: ServerThread
) -> None:
    gw = audit_gateway(pipeline=["cache"], plugins={"cache": CachePlugin()})
    _chat(gw, "req-cache-miss")
    _chat(gw, "req-cache-hit")
    _chat(gw, "req-cache-hit-stream", stream=True)
    miss, hit = _one(gw, "req-cache-miss"), _one(gw, "req-cache-hit")
    assert miss["cache"] == "miss" and miss["deployment"] == "mock-model"
    assert hit["cache"] == "hit" and hit["answered_by"] == "cache"
    assert hit["deployment"] is None and hit["attempts"] == 0 and hit["cost_usd"] == 0
    assert "cache:hit" in hit["decisions"]
    assert _one(gw, "req-cache-hit-stream")["cache"] == "hit"
    assert mock_upstream.app.settings.stats["requests"] == 1
    metrics = _metrics(gw)
    assert 'veil_audit_cache_total{status="hit",team="test"} 2.0' in metrics
    assert 'veil_audit_cache_total{status="miss",team="test"} 1.0' in metrics


def test_failover_and_an_upstream_failure_after_failover_are_recorded(
    audit_gateway: Callable[..., AuditGateway], mock_upstream: ServerThread
) -> None:
    with ServerThread(MockUpstream()) as broken:
        broken.app.settings.fail_rate = 1.0
        gw = audit_gateway(
            deployments=[
                upstream(broken.url, model="upstream-broken"),
                upstream(mock_upstream.url),
            ]
        )
        _chat(gw, "req-failover")
        r = _one(gw, "req-failover")
        assert r["status"] == 200 and r["failovers"] == 1 and r["attempts"] == 2
        assert r["deployment"] == "mock-model" and r["upstream_model"] == "upstream-1"
        assert "core:routed" in r["decisions"]
        mock_upstream.app.settings.fail_rate = 1.0
        with pytest.raises(openai.APIStatusError) as e:
            _chat(gw, "req-all-failed")
        r = _one(gw, "req-all-failed")
        assert r["status"] == e.value.status_code >= 500
        assert r["failovers"] == 1 and r["attempts"] == 2 and r["deployment"] is None
        assert r["error"]["code"] and r["error"]["type"]
        assert 'veil_audit_failovers_total{model="mock-model",team="test"} 2.0' in _metrics(gw)


def _with_budget(
    audit_gateway: Callable[..., AuditGateway], tmp_path: Any, **section: Any
) -> tuple[AuditGateway, Any]:
    """An audit gateway behind the real veil-budget (SQLite under ``tmp_path``,
    ``section`` added to its policy section), and the veil_budget module;
    the test is skipped when veil-budget is not installed."""
    veil_budget = pytest.importorskip("veil_budget", reason="veil-budget is not installed")
    gw = audit_gateway(
        pipeline=["budget"],
        plugins={"budget": veil_budget},
        sections={"budget": {"sqlite_path": str(tmp_path / "budget.sqlite3"), **section}},
    )
    return gw, veil_budget


def test_a_call_refused_by_an_earlier_stage_is_recorded(
    audit_gateway: Callable[..., AuditGateway], tmp_path: Any
) -> None:
    gw, veil_budget = _with_budget(
        audit_gateway, tmp_path, budgets=[{"scope": "team", "period": "day", "limit_usd": 0.000001}]
    )
    with pytest.raises(openai.RateLimitError):
        _chat(gw, "req-budget", max_tokens=100)
    r = _one(gw, "req-budget")
    assert r["status"] == 429 and r["error"]["code"] == "budget_exceeded"
    assert r["budget"] == {"action": "refused", "reason": "budget"}
    assert r["attempts"] == 0 and r["deployment"] is None
    assert r["plugins"] == {"budget": veil_budget.__version__, "audit": "0.1.0"}
    assert 'veil_audit_budget_refusals_total{reason="budget",team="test"} 1.0' in _metrics(gw)


def test_a_call_larger_than_a_tokens_per_minute_limit_is_recorded_as_refused(
    audit_gateway: Callable[..., AuditGateway], tmp_path: Any
) -> None:
    gw, _ = _with_budget(audit_gateway, tmp_path, rate_limits=[{"scope": "team", "tpm": 1000}])
    with pytest.raises(openai.RateLimitError):
        _chat(gw, "req-tpm", max_tokens=5000)  # alone more than the minute's tokens
    r = _one(gw, "req-tpm")
    assert r["status"] == 429 and r["error"]["code"] == "rate_limit_exceeded"
    assert r["budget"] == {"action": "refused", "reason": "rate"}
    assert 'veil_audit_budget_refusals_total{reason="rate",team="test"} 1.0' in _metrics(gw)


def test_a_settled_budget_is_in_the_record(
    audit_gateway: Callable[..., AuditGateway], tmp_path: Any
) -> None:
    gw, _ = _with_budget(
        audit_gateway, tmp_path, budgets=[{"scope": "team", "period": "day", "limit_usd": 100}]
    )
    _chat(gw, "req-settled")
    r = _one(gw, "req-settled")
    # budget settles after audit's on_response would have run: on_finish sees it
    assert r["budget"]["action"] == "settled"
    assert r["budget"]["usd"] == pytest.approx(r["cost_usd"])


def test_a_call_blocked_for_personal_data_is_recorded_by_type_and_action(
    audit_gateway: Callable[..., AuditGateway],
) -> None:
    veil_pii = pytest.importorskip("veil_pii", reason="veil-pii is not installed")
    gw = audit_gateway(
        pipeline=["pii"],
        plugins={"pii": veil_pii},
        # a generous analysis bound: this machine may be busy
        sections={"pii": {"actions": {"CREDIT_CARD": "block"}, "timeout_ms": 30000}},
    )
    card = "Charge 4111 1111 1111 1111 for Zoe Young, zoe@example.com"
    with pytest.raises(openai.BadRequestError):
        _chat(gw, "req-pii-block", messages=[{"role": "user", "content": card}])
    _chat(gw, "req-pii-redact", messages=[{"role": "user", "content": "Mail zoe@example.com"}])
    blocked, redacted = _one(gw, "req-pii-block"), _one(gw, "req-pii-redact")
    assert blocked["status"] == 400 and blocked["error"]["code"] == "pii_blocked"
    assert blocked["pii"] == {"CREDIT_CARD": {"blocked": 1}}
    assert redacted["pii"] == {"EMAIL_ADDRESS": {"redacted": 1}}
    text = (gw.directory / "audit.jsonl").read_text()
    # the whole number: a short run of digits like "4111" turns up in hashes by chance
    for value in ("4111 1111 1111 1111", "4111111111111111", "Zoe", "zoe@example.com"):
        assert value not in text
    metrics = _metrics(gw)
    assert 'veil_audit_pii_detections_total{action="blocked",entity_type="CREDIT_CARD"} 1.0' in (
        metrics
    )


def test_bad_input_after_the_call_exists_is_recorded(
    audit_gateway: Callable[..., AuditGateway],
) -> None:
    gw = audit_gateway()
    with pytest.raises(openai.NotFoundError):
        _chat(gw, "req-no-model", model="a name a client made up")
    r = _one(gw, "req-no-model")
    assert r["status"] == 404 and r["error"]["code"] == "model_not_found"
    assert r["model"] == "(not in policy)"
    assert "made up" not in (gw.directory / "audit.jsonl").read_text()


def test_every_call_has_exactly_one_record(
    audit_gateway: Callable[..., AuditGateway], mock_upstream: ServerThread
) -> None:
    gw = audit_gateway(pipeline=["cache"], plugins={"cache": CachePlugin()})
    ids = []
    for i in range(12):
        rid = f"req-many-{i}"
        ids.append(rid)
        with contextlib.suppress(openai.APIStatusError):
            _chat(
                gw,
                rid,
                stream=i % 3 == 0,
                messages=[{"role": "user", "content": f"q{i % 4}"}],
                model="mock-model" if i % 5 else "unknown-model",
            )
    seen = by_request(gw.directory)
    assert sorted(seen) == sorted(ids)
    assert all(len(v) == 1 for v in seen.values())
    assert len(calls(gw.directory)) == 12
