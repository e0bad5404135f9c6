"""veil-cache with the plugins it works with, in one real gateway:
``pii`` (the store holds placeholders, never values; a hit is restored with
the current caller's values), ``budget`` (a hit costs nothing and gives its
reservation back) and ``audit`` (the record says hit)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from cachetest import PLUGIN, ask, ask_stream, cache_stage, upstream_requests

from veil.testing import ADMIN_KEY, ServerThread

Start = Callable[..., ServerThread]

PII_SAMPLE = PLUGIN.parent / "pii" / "tests" / "data" / "pii_sample.jsonl"
"""veil-pii's vendored labelled sample (MIT, presidio-research; see its README)."""
PROTECTED = {
    "PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "STREET_ADDRESS", "CREDIT_CARD", "US_SSN",
    "IBAN_CODE", "IP_ADDRESS",
}  # fmt: skip
ZOE = "Write to Zoe Young (zoe.young@acme.com) about the renewal of the contract."
LIAM = "Write to Liam Baker (liam.baker@acme.com) about the renewal of the contract."
AUDIT_KEY = "test-audit-key-0123456789abcdef"


def _words(text: str) -> str:
    return " ".join(text.split())


def _strings(doc: Any) -> list[str]:
    """Every string inside a parsed JSON document (values, not keys)."""
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in _strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in _strings(v)]
    return []


def _stored_text(gw: ServerThread) -> str:
    """Every string the memory store holds, one per line."""
    store = cache_stage(gw).store
    return "\n".join(
        s for _, value in store._entries.values() for s in _strings(orjson.loads(value))
    )


def _modules(*names: str) -> dict[str, Any]:
    import importlib

    return {n: importlib.import_module(f"veil_{n}") for n in names}


@pytest.fixture
def pii_cache(cache_gateway: Start) -> ServerThread:
    return cache_gateway(pipeline=["pii", "cache"], plugins=_modules("pii"))


def test_the_store_holds_no_labelled_value_that_pii_replaced(
    pii_cache: ServerThread, mock_upstream: ServerThread
) -> None:
    if not PII_SAMPLE.is_file():
        pytest.skip(f"veil-pii's labelled sample is not in this tree ({PII_SAMPLE.name})")
    records = [json.loads(line) for line in PII_SAMPLE.read_text().splitlines() if line.strip()]
    mock_upstream.app.settings.record = True

    def send(record: dict[str, Any]) -> bool:
        try:
            ask(pii_cache, record["text"], user=record["id"])
        except openai.BadRequestError as e:  # a type the policy blocks: nothing stored
            assert e.code == "pii_blocked"
            return False
        return True

    with ThreadPoolExecutor(4) as pool:
        served = sum(pool.map(send, records))
    assert served > 100
    stored = _words(_stored_text(pii_cache))
    upstream = _words(
        "\n".join(s for b in mock_upstream.app.settings.received for s in _strings(orjson.loads(b)))
    )
    # template-made texts often redact to the same text: those were hits
    counters = cache_stage(pii_cache).counters
    assert counters["stored"] + counters["hits"] == served
    # (two concurrent misses of one text both store it: one entry)
    assert 0 < len(cache_stage(pii_cache).store._entries) <= counters["stored"]
    total = in_store = 0
    for record in records:
        for span in record["spans"]:
            if span["type"] not in PROTECTED:
                continue
            value = _words(record["text"][span["start"] : span["end"]])
            pattern = rf"(?<!\w){re.escape(value)}(?!\w)"
            total += 1
            if re.search(pattern, stored):
                in_store += 1
                # only what the upstream was sent (pii's own misses) may be cached
                assert re.search(pattern, upstream), f"{record['id']}: stored, never sent"
    print(f"labelled values in the cache: {in_store}/{total}, each one pii let through upstream")
    assert total > 100
    assert in_store / total <= 0.05, f"{in_store}/{total} labelled values in the cache"
    assert "<PERSON_1>" in stored


def test_a_hit_is_restored_with_the_current_callers_values(
    pii_cache: ServerThread, mock_upstream: ServerThread
) -> None:
    header_a, answer_a = ask(pii_cache, ZOE)
    header_b, answer_b = ask(pii_cache, LIAM)
    assert (header_a, header_b) == ("miss", "hit")
    assert upstream_requests(mock_upstream) == 1
    text_a = answer_a.choices[0].message.content
    text_b = answer_b.choices[0].message.content
    assert "Zoe Young" in text_a and "zoe.young@acme.com" in text_a
    assert "Liam Baker" in text_b and "liam.baker@acme.com" in text_b
    assert "Zoe" not in text_b and "zoe.young" not in text_b
    stored = _stored_text(pii_cache)
    assert "<PERSON_1>" in stored and "Zoe" not in stored and "Liam" not in stored
    # streamed: restored chunk by chunk, with B's values
    header_s, streamed, _ = ask_stream(pii_cache, LIAM)
    assert header_s == "hit" and streamed == text_b


def test_a_hit_costs_nothing_and_the_audit_record_says_hit(
    cache_gateway: Start,
    mock_upstream: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VEIL_AUDIT_HMAC_KEY", AUDIT_KEY)
    mock_upstream.app.settings.usage = {"prompt_tokens": 10, "completion_tokens": 100}
    audit_dir = tmp_path / "audit"
    gw = cache_gateway(
        pipeline=["pii", "budget", "cache", "audit"],
        plugins=_modules("pii", "budget", "audit"),
        sections={
            "budget": {
                "sqlite_path": str(tmp_path / "budget.sqlite3"),
                "budgets": [{"scope": "team", "period": "day", "limit_usd": 10.0}],
            },
            "audit": {"path": str(audit_dir)},
        },
    )
    # mock-model: $1 in, $2 out per million: 10 + 100 tokens cost $0.00021
    _, miss = ask(gw, "How long do refunds take?", max_tokens=100)
    h1, hit = ask(gw, "How long do refunds take?", max_tokens=100)
    h2, _, chunks = ask_stream(gw, "How long do refunds take?", max_tokens=100, usage=True)
    assert (h1, h2) == ("hit", "hit")
    assert upstream_requests(mock_upstream) == 1
    assert hit.usage is not None and hit.usage.completion_tokens == 100  # what it once cost
    spend = httpx.get(
        gw.url + "/admin/spend", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    (budget,) = [b for b in spend["budgets"] if b["key"].startswith("team:test:")]
    assert budget["spent_usd"] == pytest.approx(0.00021)
    assert budget["reserved_usd"] == 0
    assert spend["total_usd"] == pytest.approx(0.00021)
    from veil_audit.files import chain_files, read_records_bytes

    records = [
        orjson.loads(line)
        for path in chain_files(audit_dir)
        for line in read_records_bytes(path).splitlines()
    ]
    calls = {r["request_id"]: r for r in records if r["event"] == "call"}
    hits = [r for r in calls.values() if r["cache"] == "hit"]
    stored = [r for r in calls.values() if r["cache"] == "stored"]
    assert len(hits) == 2 and len(stored) == 1
    for r in hits:
        assert r["answered_by"] == "cache"
        assert r["cost_usd"] == 0 and r["tokens_in"] == 0 and r["tokens_out"] == 0
        assert r["budget"]["action"] == "settled" and r["budget"]["usd"] == 0
        assert "cache:hit" in r["decisions"]
    assert stored[0]["cost_usd"] == pytest.approx(0.00021)
    assert miss.choices[0].message.content == hit.choices[0].message.content
