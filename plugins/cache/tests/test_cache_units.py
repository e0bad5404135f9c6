"""The cache's plain modules without a gateway: keys, the memory store, the
sealer, settings."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import cachetest  # noqa: F401 - puts the plugin's source tree on sys.path
import numpy as np
import pytest
import veil_cache
from veil_cache.keys import exact_key, last_user_text, partition_key
from veil_cache.seal import BadKey, SealBroken, Sealer, load_key
from veil_cache.store import ENTRY_OVERHEAD, MemoryStore

from veil import Call, Principal
from veil.errors import PolicyError
from veil.metrics import Metrics
from veil.policy import parse_policy
from veil.runtime import Runtime
from veil.testing import policy_toml


def _policy(version: int = 1) -> Any:
    return parse_policy(policy_toml(version=version).encode())


def _call(request: dict[str, Any], team: str = "test", version: int = 1) -> Call:
    policy = _policy(version)
    return Call(
        id="r1",
        kind="chat",
        request=request,
        principal=Principal("k", team),
        policy=policy,
        headers={},
    )


BASE = {
    "model": "mock-model",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "temperature": 0,
}


def test_the_key_ignores_delivery_fields_and_holds_no_text() -> None:
    key = exact_key(_call(dict(BASE)))
    same = {**BASE, "stream": True, "stream_options": {"include_usage": True}, "user": "u"}
    assert exact_key(_call(same)) == key
    assert exact_key(_call({**BASE, "metadata": {"a": "b"}})) == key
    assert len(key) == 64 and "Hi" not in key


@pytest.mark.parametrize(
    "change",
    [{"temperature": 0.5}, {"max_tokens": 3}, {"model": "test-only"}, {"n": 2}, {"seed": 1}],
)
def test_the_key_changes_with_anything_that_changes_the_answer(change: dict[str, Any]) -> None:
    assert exact_key(_call({**BASE, **change})) != exact_key(_call(dict(BASE)))


def test_the_key_is_namespaced_by_team_and_policy_version() -> None:
    key = exact_key(_call(dict(BASE)))
    assert exact_key(_call(dict(BASE), team="other")) != key
    assert exact_key(_call(dict(BASE), version=2)) != key


def test_the_partition_leaves_out_only_the_last_user_text() -> None:
    part = partition_key(_call(dict(BASE)))
    other_q = {**BASE, "messages": [BASE["messages"][0], {"role": "user", "content": "Bye"}]}
    assert partition_key(_call(other_q)) == part
    other_sys = {**BASE, "messages": [{"role": "system", "content": "X"}, BASE["messages"][1]]}
    assert partition_key(_call(other_sys)) != part
    assert last_user_text(BASE) == "Hi"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
    assert last_user_text(parts) == "a"
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    assert last_user_text(image) is None
    assert last_user_text({"messages": [{"role": "assistant", "content": "x"}]}) is None


def test_the_memory_store_bounds_entries_and_bytes() -> None:
    async def run() -> None:
        store = MemoryStore(ttl_s=60, max_entries=3, max_bytes=10_000, max_entry_bytes=5_000)
        for i in range(10):
            assert await store.put("t", f"k{i}", b"x" * 1000)
            assert len(store._entries) <= 3 and store.bytes <= 10_000
        assert await store.get("t", "k0") is None and await store.get("t", "k9") is not None
        assert not await store.put("t", "big", b"x" * 6000)  # over max_entry_bytes
        by_bytes = MemoryStore(ttl_s=60, max_entries=100, max_bytes=3000, max_entry_bytes=3000)
        for i in range(50):
            await by_bytes.put("t", f"k{i}", secrets.token_bytes(900 + i))
            assert by_bytes.bytes <= 3000
        assert by_bytes.bytes == sum(len(v) + ENTRY_OVERHEAD for _, v in by_bytes._entries.values())
        kept = len(by_bytes._entries)
        assert kept == 2  # 3000 bytes hold two of these
        assert await by_bytes.clear(None) == kept and by_bytes.bytes == 0

    asyncio.run(run())


def test_the_memory_store_expires_entries_and_clears_by_team() -> None:
    async def run() -> None:
        store = MemoryStore(ttl_s=60, max_entries=10, max_bytes=10_000, max_entry_bytes=5_000)
        await store.put("a", "k", b"1")
        await store.put("b", "k", b"2")
        assert await store.get("a", "k") == b"1" and await store.get("b", "k") == b"2"
        assert await store.clear("a") == 1
        assert await store.get("a", "k") is None and await store.get("b", "k") == b"2"
        store.ttl_s = -1
        await store.put("c", "k", b"3")
        assert await store.get("c", "k") is None  # already expired
        assert store.bytes == 1 + ENTRY_OVERHEAD

    asyncio.run(run())


def test_the_vector_index_returns_the_nearest_question_of_its_partition() -> None:
    async def run() -> None:
        store = MemoryStore(
            ttl_s=60, max_entries=10, max_bytes=10_000, max_entry_bytes=5_000, max_per_partition=2
        )
        e = np.eye(384, dtype=np.float32)
        await store.add_vector("t", "p", "k1", e[0])
        await store.add_vector("t", "p", "k2", e[1])
        assert await store.nearest("t", "p", e[1]) == ("k2", 1.0)
        assert await store.nearest("t", "q", e[1]) is None
        assert await store.nearest("u", "p", e[1]) is None
        await store.add_vector("t", "p", "k3", e[2])  # the oldest row goes
        found = await store.nearest("t", "p", e[0])
        assert found is not None and found[0] != "k1"

    asyncio.run(run())


def test_sealed_values_open_only_with_their_key_and_name(monkeypatch: pytest.MonkeyPatch) -> None:
    key = secrets.token_bytes(32)
    sealed = Sealer(key).seal(b"name", b"plain answer")
    assert b"plain" not in sealed
    assert Sealer(key).open(b"name", sealed) == b"plain answer"
    for sealer, name in ((Sealer(secrets.token_bytes(32)), b"name"), (Sealer(key), b"other")):
        with pytest.raises(SealBroken):
            sealer.open(name, sealed)
    monkeypatch.setenv("K", key.hex())
    assert load_key("K") == key
    monkeypatch.setenv("K", "bm90IDMyIGJ5dGVz")
    with pytest.raises(BadKey, match="32 bytes"):
        load_key("K")


@pytest.mark.parametrize(
    "section",
    [
        {"ttl_s": -1},
        {"store": "disk"},
        {"colour": "blue"},
        {"semantic": {"threshold": 1.5}},
        {"max_bytes": 0},
    ],
)
def test_an_invalid_section_makes_the_policy_invalid(section: dict[str, Any]) -> None:
    from cachetest import render

    text = policy_toml(pipeline=["cache"]) + render("cache", section)
    with pytest.raises(PolicyError, match=r"\[cache\]"):
        Runtime.build(parse_policy(text.encode()), Metrics(), {"cache": veil_cache})


def test_the_version_matches_the_distribution() -> None:
    from importlib.metadata import version

    assert veil_cache.__version__ == version("veil-cache")


def test_every_module_has_a_sorted_all_of_names_it_defines() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(veil_cache.__path__):
        module = importlib.import_module(f"veil_cache.{info.name}")
        names = list(module.__all__)
        assert names == sorted(names), info.name
        assert all(hasattr(module, n) for n in names), info.name
    assert list(veil_cache.__all__) == sorted(veil_cache.__all__)
