"""Conversation vaults: consistent, sealed, team-scoped, expiring, in memory
and in a real Redis; and the key they are sealed with."""

from __future__ import annotations

import asyncio
import base64
import os
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis as redis_sync
import redis.exceptions
import veil_pii.vault as vault_module
from piitest import PiiGateway, upstream_deployments
from veil_pii.placeholders import PlaceholderMap, parse_placeholder
from veil_pii.vault import (
    MemoryVault,
    RedisVault,
    Sealer,
    TamperedRecord,
    Vault,
    build_vault,
    load_key,
)

from veil.testing import OTHER_KEY, PolicyKit, RedisServer, ServerThread, free_port, policy_toml

KEY = bytes(range(32))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def flushed(redis_server: RedisServer) -> RedisServer:
    """The session's Redis, emptied."""
    redis_server.command("FLUSHALL")
    return redis_server


@pytest.fixture
def inspect(flushed: RedisServer) -> Iterator[Any]:
    """A plain client to look at (and tamper with) what a vault stored."""
    client = redis_sync.Redis.from_url(flushed.url)
    yield client
    client.close()


@pytest.fixture(params=["memory", "redis"])
async def vault(request: pytest.FixtureRequest) -> AsyncIterator[Vault]:
    if request.param == "memory":
        yield MemoryVault(Sealer(KEY), ttl_s=60)
        return
    server: RedisServer = request.getfixturevalue("flushed")
    v = RedisVault(server.url, Sealer(KEY), ttl_s=60)
    yield v
    await v.close()


def number(placeholder: str) -> int:
    parsed = parse_placeholder(placeholder)
    assert parsed is not None
    return parsed[1]


def test_all_is_sorted() -> None:
    assert list(vault_module.__all__) == sorted(vault_module.__all__)


# -- Sealer -------------------------------------------------------------------------------


def test_sealer_round_trips_and_binds_the_associated_data() -> None:
    sealer = Sealer(KEY)
    blob = sealer.seal(b"Zoe Young", b"team\x00conv")
    assert b"Zoe" not in blob
    assert sealer.seal(b"Zoe Young", b"team\x00conv") != blob  # a fresh nonce each time
    assert sealer.open(blob, b"team\x00conv") == b"Zoe Young"
    with pytest.raises(TamperedRecord, match="failed authentication"):
        sealer.open(blob, b"other\x00conv")
    with pytest.raises(TamperedRecord):
        sealer.open(blob[:-1] + bytes([blob[-1] ^ 1]), b"team\x00conv")
    with pytest.raises(TamperedRecord):
        sealer.open(blob[:8], b"team\x00conv")
    with pytest.raises(TamperedRecord):
        Sealer(os.urandom(32)).open(blob, b"team\x00conv")


def test_sealer_digest_is_keyed_and_the_key_must_be_32_bytes() -> None:
    a, b = Sealer(KEY), Sealer(os.urandom(32))
    assert a.digest(b"+1 555 0100") == Sealer(KEY).digest(b"+1 555 0100")
    assert a.digest(b"+1 555 0100") != b.digest(b"+1 555 0100")
    assert len(a.digest(b"x")) == 64
    assert repr(a) == "Sealer(<key hidden>)"
    with pytest.raises(ValueError, match="32 bytes, got 16"):
        Sealer(os.urandom(16))


# -- both vaults ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_same_value_keeps_its_placeholder_across_calls(vault: Vault) -> None:
    first = await vault.assign(
        "t", "c1", [("PERSON", "Zoe Young"), ("EMAIL_ADDRESS", "z@a.io"), ("PERSON", "Ava")]
    )
    assert first.entries == {
        "<PERSON_1>": "Zoe Young",
        "<EMAIL_ADDRESS_1>": "z@a.io",
        "<PERSON_2>": "Ava",
    }
    again = await vault.assign(
        "t", "c1", [("PERSON", "zoe  YOUNG"), ("PERSON", "Liam"), ("EMAIL_ADDRESS", "Y@b.io")]
    )
    assert again.find("PERSON", "ZOE young") == "<PERSON_1>"
    assert again.get("<PERSON_1>") == "Zoe Young"  # the form seen first
    assert again.find("PERSON", "Liam") == "<PERSON_3>"
    assert again.find("EMAIL_ADDRESS", "y@b.io") == "<EMAIL_ADDRESS_2>"
    assert len(again) == 5
    assert (await vault.load("t", "c1")).entries == again.entries
    # numbering goes on as PlaceholderMap.assign would on the loaded table
    local = PlaceholderMap(again.entries)
    assert local.assign("PERSON", "Noor") == "<PERSON_4>"
    assert (await vault.assign("t", "c1", [("PERSON", "Noor")])).find("PERSON", "Noor") == (
        "<PERSON_4>"
    )


@pytest.mark.anyio
async def test_repeats_within_one_call_share_a_placeholder(vault: Vault) -> None:
    table = await vault.assign(
        "t", "c", [("PERSON", "Zoe Young"), ("PERSON", "ZOE YOUNG"), ("LOCATION", "Zoe Young")]
    )
    assert table.entries == {"<PERSON_1>": "Zoe Young", "<LOCATION_1>": "Zoe Young"}


@pytest.mark.anyio
async def test_a_conversation_id_is_scoped_to_its_team(vault: Vault) -> None:
    await vault.assign("team-a", "shared", [("PERSON", "Zoe Young"), ("PERSON", "Ava")])
    other = await vault.assign("team-b", "shared", [("PERSON", "Liam Carter")])
    assert other.entries == {"<PERSON_1>": "Liam Carter"}
    assert (await vault.load("team-c", "shared")).entries == {}
    assert (await vault.load("team-a", "shared")).find("PERSON", "Liam Carter") is None
    assert (await vault.load("team-a", "other-conversation")).entries == {}


@pytest.mark.anyio
async def test_loading_an_unknown_conversation_stores_nothing(vault: Vault) -> None:
    assert len(await vault.load("t", "never-seen")) == 0
    assert len(await vault.assign("t", "never-seen", [])) == 0
    if isinstance(vault, MemoryVault):
        assert len(vault) == 0
    else:
        assert isinstance(vault, RedisVault)
        assert await vault.client.keys() == [b"veil:pii:keycheck"]  # the key marker only


@pytest.mark.anyio
async def test_bad_entity_types_and_team_ids_are_refused_before_storing(vault: Vault) -> None:
    with pytest.raises(ValueError, match="not an entity type: 'person'"):
        await vault.assign("t", "c", [("PERSON", "Zoe"), ("person", "Ava")])
    with pytest.raises(ValueError, match="NUL"):
        await vault.assign("t\x00x", "c", [("PERSON", "Zoe")])
    assert len(await vault.load("t", "c")) == 0


# -- expiry -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_memory_tables_expire_after_their_last_use() -> None:
    clock = Clock()
    vault = MemoryVault(Sealer(KEY), ttl_s=10, clock=clock)
    await vault.assign("t", "a", [("PERSON", "Zoe")])
    clock.now += 9
    assert len(await vault.load("t", "a")) == 1  # a load refreshes the time to live
    clock.now += 9
    assert len(await vault.assign("t", "a", [("PERSON", "zoe")])) == 1  # and so does an assign
    clock.now += 9.5
    assert len(await vault.load("t", "a")) == 1
    clock.now += 10
    assert len(await vault.load("t", "a")) == 0
    assert len(vault) == 0  # swept, not just hidden
    table = await vault.assign("t", "a", [("PERSON", "Liam")])
    assert table.entries == {"<PERSON_1>": "Liam"}  # a fresh table numbers from 1


@pytest.mark.anyio
async def test_memory_evicts_the_least_recently_used_beyond_its_limit() -> None:
    clock = Clock()
    vault = MemoryVault(Sealer(KEY), ttl_s=100, max_conversations=2, clock=clock)
    await vault.assign("t", "x", [("PERSON", "X")])
    clock.now += 1
    await vault.assign("t", "y", [("PERSON", "Y")])
    clock.now += 1
    await vault.load("t", "x")  # x is now more recent than y
    clock.now += 1
    await vault.assign("t", "z", [("PERSON", "Z")])
    assert len(vault) == 2
    assert len(await vault.load("t", "y")) == 0
    assert len(await vault.load("t", "x")) == 1
    assert len(await vault.load("t", "z")) == 1


@pytest.mark.anyio
async def test_redis_tables_expire_and_use_refreshes_them(
    flushed: RedisServer, inspect: Any
) -> None:
    vault = RedisVault(flushed.url, Sealer(KEY), ttl_s=0.4)
    try:
        await vault.assign("t", "short", [("PERSON", "Zoe")])
        key = vault.key("t", "short")
        assert 0 < int(inspect.pttl(key)) <= 400
        await asyncio.sleep(0.25)
        assert len(await vault.load("t", "short")) == 1
        assert int(inspect.pttl(key)) > 300  # refreshed by the load
        await asyncio.sleep(0.25)
        assert len(await vault.assign("t", "short", [("PERSON", "Ava")])) == 2
        await asyncio.sleep(0.6)
        assert len(await vault.load("t", "short")) == 0
        assert inspect.exists(key) == 0
    finally:
        await vault.close()


@pytest.mark.anyio
async def test_a_replica_with_another_vault_key_is_refused_not_given_empty_tables(
    flushed: RedisServer,
) -> None:
    first = RedisVault(flushed.url, Sealer(KEY), ttl_s=60)
    other = RedisVault(flushed.url, Sealer(b"\x01" * 32), ttl_s=60)
    same = RedisVault(flushed.url, Sealer(KEY), ttl_s=60)
    try:
        await first.assign("t", "c", [("PERSON", "Zoe")])
        with pytest.raises(TamperedRecord, match="another vault key"):
            await other.check_key()
        with pytest.raises(TamperedRecord, match="another vault key"):
            await other.load("t", "c")  # not an empty table
        assert (await same.load("t", "c")).entries == {"<PERSON_1>": "Zoe"}
    finally:
        for vault in (first, other, same):
            await vault.close()


# -- nothing in clear ---------------------------------------------------------------------------


SECRETS = ["Zoe Young", "zoe.young@acme.com", "+1 415 555 0100", "conversation-secret-id"]


def contains_secret(dump: bytes) -> list[str]:
    low = dump.lower()
    return [s for s in SECRETS if s.lower().encode() in low]


@pytest.mark.anyio
async def test_redis_stores_no_value_and_no_conversation_id_in_clear(
    flushed: RedisServer, inspect: Any
) -> None:
    vault = RedisVault(flushed.url, Sealer(KEY), ttl_s=60)
    try:
        await vault.assign(
            "team",
            "conversation-secret-id",
            [("PERSON", SECRETS[0]), ("EMAIL_ADDRESS", SECRETS[1]), ("PHONE_NUMBER", SECRETS[2])],
        )
    finally:
        await vault.close()
    keys = [k for k in inspect.scan_iter() if k != b"veil:pii:keycheck"]
    assert len(keys) == 1
    dump = b"".join(keys)
    for key in keys:
        assert inspect.type(key) == b"hash"
        dump += b"".join(k + v for k, v in inspect.hgetall(key).items())
    assert contains_secret(dump) == []
    assert b"team" not in dump


@pytest.mark.anyio
async def test_memory_holds_no_value_and_no_conversation_id_in_clear() -> None:
    vault = MemoryVault(Sealer(KEY), ttl_s=60)
    table = await vault.assign(
        "team",
        "conversation-secret-id",
        [("PERSON", SECRETS[0]), ("EMAIL_ADDRESS", SECRETS[1]), ("PHONE_NUMBER", SECRETS[2])],
    )
    assert len(table) == 3
    dump = b""
    for name, record in vault._records.items():
        dump += name.encode() + repr(record).encode()
        dump += b"".join(k.encode() + v for k, v in record.fields.items())
    assert contains_secret(dump) == []


# -- tampering --------------------------------------------------------------------------------


@pytest.fixture
async def sealed(flushed: RedisServer) -> AsyncIterator[RedisVault]:
    """A Redis vault holding team-a's conversation ``c``."""
    vault = RedisVault(flushed.url, Sealer(KEY), ttl_s=60)
    await vault.assign(
        "team-a", "c", [("PERSON", "Zoe Young"), ("PERSON", "Liam"), ("EMAIL_ADDRESS", "z@a.io")]
    )
    yield vault
    await vault.close()


@pytest.mark.anyio
async def test_an_altered_sealed_value_does_not_open(sealed: RedisVault, inspect: Any) -> None:
    key = sealed.key("team-a", "c")
    blob = bytearray(inspect.hget(key, "p:<PERSON_1>"))
    blob[-1] ^= 1
    inspect.hset(key, "p:<PERSON_1>", bytes(blob))
    with pytest.raises(TamperedRecord, match="failed authentication"):
        await sealed.load("team-a", "c")
    with pytest.raises(TamperedRecord):
        await sealed.assign("team-a", "c", [("PERSON", "Ava")])


@pytest.mark.parametrize(("team", "conversation"), [("team-b", "c"), ("team-a", "d")])
@pytest.mark.anyio
async def test_a_record_copied_to_another_team_or_conversation_does_not_open(
    sealed: RedisVault, inspect: Any, team: str, conversation: str
) -> None:
    fields = inspect.hgetall(sealed.key("team-a", "c"))
    inspect.hset(sealed.key(team, conversation), mapping=fields)
    with pytest.raises(TamperedRecord, match="failed authentication"):
        await sealed.load(team, conversation)


@pytest.mark.anyio
async def test_values_moved_between_placeholders_are_detected(
    sealed: RedisVault, inspect: Any
) -> None:
    key = sealed.key("team-a", "c")
    fields = inspect.hgetall(key)
    # swap the values of two placeholders without their index entries
    inspect.hset(key, "p:<PERSON_1>", fields[b"p:<PERSON_2>"])
    inspect.hset(key, "p:<PERSON_2>", fields[b"p:<PERSON_1>"])
    with pytest.raises(TamperedRecord, match="inconsistent"):
        await sealed.load("team-a", "c")
    # move a value, with its index entry, under a placeholder of another type
    inspect.delete(key)
    vid = fields[b"p:<PERSON_1>"][:64]
    moved = {
        b"p:<EMAIL_ADDRESS_1>": fields[b"p:<PERSON_1>"],
        b"v:" + vid: b"<EMAIL_ADDRESS_1>",
    }
    inspect.hset(key, mapping=moved)
    with pytest.raises(TamperedRecord, match="another type"):
        await sealed.load("team-a", "c")


@pytest.mark.anyio
async def test_an_altered_memory_record_does_not_open() -> None:
    vault = MemoryVault(Sealer(KEY), ttl_s=60)
    await vault.assign("t", "c", [("PERSON", "Zoe Young")])
    (record,) = vault._records.values()
    blob = bytearray(record.fields["p:<PERSON_1>"])
    blob[70] ^= 1
    record.fields["p:<PERSON_1>"] = bytes(blob)
    with pytest.raises(TamperedRecord):
        await vault.load("t", "c")


# -- concurrency ------------------------------------------------------------------------------


def check_consistent(table: PlaceholderMap) -> None:
    """One placeholder per value identity, one value per placeholder, numbers 1..k per type."""
    by_type: dict[str, list[int]] = {}
    identities: set[tuple[str, str]] = set()
    for placeholder, value in table.entries.items():
        parsed = parse_placeholder(placeholder)
        assert parsed is not None
        by_type.setdefault(parsed[0], []).append(parsed[1])
        identity = (parsed[0], " ".join(value.split()).casefold())
        assert identity not in identities, "two placeholders for one value"
        identities.add(identity)
    for numbers in by_type.values():
        assert sorted(numbers) == list(range(1, len(numbers) + 1))


async def hammer(vaults: list[Any], tasks: int = 50) -> PlaceholderMap:
    """``tasks`` concurrent assigns of overlapping random values (in random
    case) over ``vaults``; every task's answer agrees with the final table."""
    rng = random.Random(7)
    people = [f"Person {i}" for i in range(25)]
    emails = [f"user{i}@example.com" for i in range(12)]
    batches = []
    for _ in range(tasks):
        batch = [("PERSON", rng.choice([p, p.upper(), p.lower()])) for p in rng.sample(people, 6)]
        batch += [("EMAIL_ADDRESS", e) for e in rng.sample(emails, 3)]
        rng.shuffle(batch)
        batches.append(batch)
    results = await asyncio.gather(
        *(vaults[i % len(vaults)].assign("t", "busy", b) for i, b in enumerate(batches))
    )
    final: PlaceholderMap = await vaults[0].load("t", "busy")
    check_consistent(final)
    for batch, table in zip(batches, results, strict=True):
        check_consistent(table)
        for kind, value in batch:
            placeholder = table.find(kind, value)
            assert placeholder is not None
            assert final.find(kind, value) == placeholder
    seen = {(k, v.casefold()) for batch in batches for k, v in batch}
    assert len(final) == len(seen)
    return final


@pytest.mark.anyio
async def test_concurrent_assigns_across_two_redis_replicas_stay_consistent(
    flushed: RedisServer,
) -> None:
    a = RedisVault(flushed.url, Sealer(KEY), ttl_s=60)
    b = RedisVault(flushed.url, Sealer(KEY), ttl_s=60)
    assert a.client.connection_pool is not b.client.connection_pool
    try:
        final = await hammer([a, b])
        assert final.types == {"PERSON", "EMAIL_ADDRESS"}
    finally:
        await a.close()
        await b.close()


@pytest.mark.anyio
async def test_concurrent_assigns_in_memory_stay_consistent() -> None:
    await hammer([MemoryVault(Sealer(KEY), ttl_s=60)])


# -- failures propagate -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_unreachable_redis_raises_instead_of_giving_an_empty_table() -> None:
    vault = RedisVault(f"redis://127.0.0.1:{free_port()}/0", Sealer(KEY), ttl_s=60, timeout_s=1)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await vault.assign("t", "c", [("PERSON", "Zoe")])
        with pytest.raises(redis.exceptions.ConnectionError):
            await vault.load("t", "c")
    finally:
        await vault.close()


# -- key and factory ------------------------------------------------------------------------------


def test_a_memory_vault_without_a_key_gets_a_random_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VEIL_TEST_VAULT_KEY", raising=False)
    first = load_key("VEIL_TEST_VAULT_KEY", "memory")
    assert len(first) == 32
    assert load_key("VEIL_TEST_VAULT_KEY", "memory") != first
    assert len(load_key(None, "memory")) == 32


def test_a_redis_vault_without_a_key_says_how_to_make_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VEIL_TEST_VAULT_KEY", raising=False)
    with pytest.raises(ValueError, match="VEIL_TEST_VAULT_KEY") as caught:
        load_key("VEIL_TEST_VAULT_KEY", "redis")
    assert "base64.b64encode(os.urandom(32))" in str(caught.value)
    monkeypatch.setenv("VEIL_TEST_VAULT_KEY", "  ")
    with pytest.raises(ValueError, match="not set"):
        load_key("VEIL_TEST_VAULT_KEY", "redis")
    with pytest.raises(ValueError, match="not set"):
        load_key(None, "redis")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"short").decode(), "must hold 32 bytes, it holds 5"),
        (base64.b64encode(bytes(48)).decode(), "it holds 48"),
    ],
)
def test_a_bad_key_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("VEIL_TEST_VAULT_KEY", value)
    for backend in ("memory", "redis"):
        with pytest.raises(ValueError, match=message) as caught:
            load_key("VEIL_TEST_VAULT_KEY", backend)
        assert value not in str(caught.value)


@pytest.mark.parametrize(
    "encode",
    [
        base64.b64encode,
        base64.urlsafe_b64encode,
        lambda k: base64.urlsafe_b64encode(k).rstrip(b"="),
        lambda k: b"  " + base64.b64encode(k) + b"\n",
    ],
)
def test_keys_load_from_standard_or_urlsafe_base64(
    monkeypatch: pytest.MonkeyPatch, encode: Callable[[bytes], bytes]
) -> None:
    key = bytes([0xFB, 0xFF, 0xBF]) * 10 + b"\xfe\xff"  # both alphabets' special characters
    monkeypatch.setenv("VEIL_TEST_VAULT_KEY", encode(key).decode())
    assert load_key("VEIL_TEST_VAULT_KEY", "redis") == key


@pytest.mark.anyio
async def test_build_vault_makes_the_backend_asked_for(flushed: RedisServer) -> None:
    memory = build_vault("memory", key=KEY, ttl_s=5, max_conversations=3)
    assert isinstance(memory, MemoryVault)
    assert memory.max_conversations == 3
    shared = build_vault("redis", key=KEY, ttl_s=5, redis_url=flushed.url, prefix="x:")
    assert isinstance(shared, RedisVault)
    try:
        await shared.assign("t", "c", [("PERSON", "Zoe")])
        assert shared.key("t", "c").startswith("x:")
        assert await shared.client.pttl(shared.key("t", "c")) > 4000
    finally:
        await shared.close()
    with pytest.raises(ValueError, match="Redis URL"):
        build_vault("redis", key=KEY, ttl_s=5)
    with pytest.raises(ValueError, match="32 bytes"):
        build_vault("memory", key=b"short", ttl_s=5)
    with pytest.raises(ValueError, match="unknown conversation store"):
        build_vault("disk", key=KEY, ttl_s=5)  # type: ignore[arg-type]


# -- two gateway replicas sharing Redis ---------------------------------------------------------


def test_replicas_share_conversations_through_redis(
    policy_kit: PolicyKit,
    start_gateway: Callable[..., ServerThread],
    mock_upstream: ServerThread,
    flushed: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VEIL_PII_REDIS_URL", flushed.url)
    monkeypatch.setenv("VEIL_PII_KEY", base64.b64encode(os.urandom(32)).decode())
    text = policy_toml(
        pipeline=["pii"],
        plugins={"pii": {}},
        sections={"pii": {"conversations": {"store": "redis"}}},
        deployments=upstream_deployments(mock_upstream.url),
    )
    path = policy_kit.write(text)
    one = PiiGateway(start_gateway(path), mock_upstream)
    two = PiiGateway(start_gateway(path), mock_upstream)
    headers = {"x-veil-conversation": "across-replicas"}
    with one.client(default_headers=headers) as c:
        c.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "I am Zoe Young."}]
        )
    with two.client(default_headers=headers) as c:
        c.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "Liam Carter and Zoe Young met."}],
        )
    with two.client(key=OTHER_KEY, default_headers=headers) as c:
        c.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "I am Ava Novak."}]
        )
    sent = [b["messages"][0]["content"] for b in one.received]
    assert sent == ["I am <PERSON_1>.", "<PERSON_2> and <PERSON_1> met.", "I am <PERSON_1>."]
