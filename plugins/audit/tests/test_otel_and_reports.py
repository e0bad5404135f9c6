"""The OpenTelemetry sink (against the SDK's in-memory exporter), and the
reports: text, JSON, and the HTML page rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from audittest import KEY, AuditGateway, CachePlugin
from click.testing import CliRunner
from veil_audit.cli import audit

_EXPORTER: Any = None


def memory_exporter() -> Any:
    """The SDK's in-memory exporter behind the global tracer provider (which
    can be set once per process)."""
    global _EXPORTER
    if _EXPORTER is None:
        pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        _EXPORTER = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    return _EXPORTER


def traffic(gw: AuditGateway) -> None:
    """A served call, a streamed one, a cache hit and a refused one."""
    with gw.client(default_headers={"x-request-id": "otel-1"}) as client:
        messages = [{"role": "user", "content": "hello"}]
        client.chat.completions.create(model="mock-model", messages=messages)
        client.chat.completions.create(model="mock-model", messages=messages)
        list(client.chat.completions.create(model="mock-model", messages=messages, stream=True))
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="missing", messages=messages)


def test_every_call_becomes_a_span_with_genai_attributes(
    audit_gateway: Callable[..., AuditGateway], mock_upstream: Any
) -> None:
    exporter = memory_exporter()
    mock_upstream.app.settings.usage = {"prompt_tokens": 12, "completion_tokens": 7}
    gw = audit_gateway(sinks=["file", "otel"])
    traffic(gw)
    gw.server.stop()  # drains the writer: every span is made
    spans = exporter.get_finished_spans()
    assert len(spans) == 4
    ok = spans[0]
    assert ok.name == "chat mock-model"
    a = ok.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "mock-model"
    assert a["gen_ai.response.model"] == "upstream-1"
    assert a["gen_ai.provider.name"] == "openai"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (12, 7)
    assert a["veil.request_id"] == "otel-1" and a["veil.team"] == "test"
    assert a["veil.cost_usd"] > 0
    assert ok.end_time > ok.start_time
    failed = spans[3]
    assert failed.status.status_code.name == "ERROR"
    assert failed.attributes["error.type"] == "model_not_found"


def report(directory: Path, *args: str, key: str | None = KEY) -> tuple[int, str]:
    result = CliRunner().invoke(
        audit, ["report", str(directory), *args], env={"VEIL_AUDIT_HMAC_KEY": key}
    )
    return result.exit_code, result.output


@pytest.fixture
def trail(audit_gateway: Callable[..., AuditGateway], mock_upstream: Any) -> Path:
    """An audit directory with a few kinds of calls, closed cleanly."""
    mock_upstream.app.settings.usage = {"prompt_tokens": 1000, "completion_tokens": 1000}
    gw = audit_gateway(pipeline=["cache"], plugins={"cache": CachePlugin()})
    traffic(gw)
    gw.server.stop()
    return gw.directory


def test_text_and_json_reports_sum_spend_and_name_the_policy(trail: Path) -> None:
    code, text = report(trail, "--since", "1d")
    assert code == 0
    assert "integrity: verified: " in text
    # one upstream call of 1000 + 1000 tokens at $2 + $8 per million; two cache hits
    assert "4 calls, $0.010000, 1000 tokens in, 1000 tokens out, 1 refused or failed" in text
    assert "spend by team:" in text and "mock-model" in text
    assert "404 model_not_found" in text and "cache: hit 2, miss 2" in text
    code, out = report(trail, "--format", "json", "--team", "test")
    data = json.loads(out)
    assert data["totals"]["calls"] == 4 and data["integrity"]["intact"] is True
    assert data["by_model"][0] == {
        "model": "mock-model", "cost_usd": pytest.approx(0.01), "calls": 3,
        "tokens_in": 1000, "tokens_out": 1000,
    }  # fmt: skip
    (policy,) = data["policies"]
    assert policy["version"] >= 1 and len(policy["signed_by"]) == 16
    assert json.loads(report(trail, "--format", "json", "--team", "other")[1])["totals"] == {
        "calls": 0, "cost_usd": 0.0, "tokens_in": 0, "tokens_out": 0, "errors": 0,
    }  # fmt: skip


def test_a_report_on_tampered_files_says_so(trail: Path) -> None:
    active = trail / "audit.jsonl"
    active.write_text(active.read_text().replace('"status":200', '"status":299', 1))
    code, text = report(trail)
    assert code == 1 and "integrity: FAILED: TAMPERED (edited)" in text
    code, text = report(trail, key=None)
    assert code == 0 and "integrity: not checked" in text


def test_a_bad_since_is_a_usage_error() -> None:
    result = CliRunner().invoke(audit, ["report", ".", "--since", "last tuesday"])
    assert result.exit_code == 2 and "7d, 24h, 30m" in result.output


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (`make test` installs Debian's chromium package)")


def test_the_html_report_is_self_contained_and_shows_its_charts(trail: Path) -> None:
    code, _ = report(trail, "--format", "html", "--out", str(trail / "report.html"))
    assert code == 0
    page = (trail / "report.html").read_text()
    # nothing to fetch: no script, no external stylesheet, image or font
    assert "<script" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", page)
    with tempfile.TemporaryDirectory(prefix="veil-chromium-") as profile:
        dom = subprocess.run(
            [
                chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--dump-dom",
                (trail / "report.html").as_uri(),
            ],
            capture_output=True, text=True, timeout=90, check=True,
            env={**os.environ, "HOME": profile},
        ).stdout  # fmt: skip
    charts = re.findall(r'<figure class="chart" data-chart="([a-z-]+)"><svg', dom)
    assert charts == ["spend-by-day", "spend-by-model", "pii-by-type", "errors"]
    assert dom.count("<rect") > 10  # bars were drawn
    for title in ("Spend per day by team", "Spend by model", "Refused or failed calls"):
        assert title in dom
    assert "Integrity:</strong> verified" in dom


def test_the_report_module_leaves_no_import_hook_behind() -> None:
    import sys

    import pygal
    import veil_audit.html  # noqa: F401

    assert not [f for f in sys.meta_path if isinstance(f, pygal.PluginImportFixer)]
