"""No personal value in any record, log line or metric.

The PII dev data (the full set from ``../shared/data/pii/dev.jsonl`` when it
exists, else the sample veil-pii vendors in ``plugins/pii/tests/data``) is
sent through a gateway running the real ``pii`` and ``audit`` plugins, as
chat calls (a third of them streamed), with labelled values in the ``user``
field too; then every labelled value is searched for in the audit files,
the records copied to stdout, the logs and ``/metrics``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from audittest import AuditGateway, calls

from veil.testing import ADMIN_KEY, TEST_KEY

REPO = Path(__file__).resolve().parents[3]
SHARED_DEV = REPO.parent / "shared" / "data" / "pii" / "dev.jsonl"
SAMPLE = REPO / "plugins" / "pii" / "tests" / "data" / "pii_sample.jsonl"
LIMIT = 240
"""At most this many records are sent (the sample has 226; the dev set 901)."""


def labelled() -> list[dict[str, Any]]:
    path = SHARED_DEV if SHARED_DEV.is_file() else SAMPLE
    if not path.is_file():
        pytest.skip(f"no labelled PII data at {SAMPLE} (the veil-pii source tree)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()][:LIMIT]


def values(records: list[dict[str, Any]]) -> set[str]:
    """Labelled values long enough to search for without chance matches."""
    found = set()
    for record in records:
        for span in record["spans"]:
            value = record["text"][span["start"] : span["end"]].strip()
            if len(value) >= 5 and re.search(r"[^\W\d_]{3}|\d{6}", value):
                found.add(value)
    return found


def test_no_labelled_value_in_records_logs_or_metrics(
    audit_gateway: Callable[..., AuditGateway], capfd: pytest.CaptureFixture[str]
) -> None:
    veil_pii = pytest.importorskip("veil_pii", reason="veil-pii is not installed")
    records = labelled()
    gw = audit_gateway(
        pipeline=["pii"],
        plugins={"pii": veil_pii},
        # a generous analysis bound: this machine may be busy
        sections={"pii": {"actions": {"CREDIT_CARD": "block"}, "timeout_ms": 30000}},
        sinks=["file", "stdout"],
    )
    people = [
        r["text"][s["start"] : s["end"]]
        for r in records
        for s in r["spans"]
        if s["type"] in ("PERSON", "EMAIL_ADDRESS")
    ]
    refused = 0
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        for i, record in enumerate(records):
            kw: dict[str, Any] = {
                "model": "mock-model",
                "messages": [{"role": "user", "content": record["text"]}],
                "user": people[i % len(people)],
            }
            try:
                if i % 3 == 0:
                    for _ in client.chat.completions.create(stream=True, **kw):
                        pass
                else:
                    client.chat.completions.create(**kw)
            except openai.APIStatusError:
                refused += 1
    metrics = httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    out, err = capfd.readouterr()
    audit_text = "\n".join(p.read_text() for p in gw.directory.glob("audit*.jsonl"))
    written = calls(gw.directory)
    assert len(written) == len(records)
    assert refused and any(r["pii"] for r in written)
    assert sum(1 for line in out.splitlines() if '"event":"call"' in line) == len(records)
    haystacks = {"audit files": audit_text, "stdout and logs": out + err, "metrics": metrics}
    for where, haystack in haystacks.items():
        leaked = sorted(v for v in values(records) | set(people) if v in haystack)
        assert not leaked, f"personal values in {where}: {leaked[:5]}"
        assert TEST_KEY not in haystack
