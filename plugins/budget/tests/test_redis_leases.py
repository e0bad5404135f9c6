"""Leases on the Redis store against a real ``redis-server``: calls served
from a lease skip the round trip, the bound holds across two replicas that
both lease, a budget near its limit is never leased, what a lease holds
comes back on close, on release and when it expires (see
:mod:`veil_budget.redis_lease`)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from budgettest import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veil_budget.redis_store import RedisStore  # noqa: E402
from veil_budget.store import Bucket, Counter, Denied, Granted, Usage  # noqa: E402

USAGE = Usage("alpha", "k1", "", "gpt-4o", prompt_tokens=10, completion_tokens=5)
TEAM = "team:alpha:month:2026-11"
CALL = 1_000  # nano-dollars: every call here reserves and costs this


@asynccontextmanager
async def leasing(url: str, **options: Any) -> AsyncIterator[RedisStore]:
    options = {"lease_calls": 8, "lease_headroom": 10, **options}
    store = RedisStore(url, **options)
    try:
        yield store
    finally:
        await store.close()


async def until_leased(store: RedisStore) -> None:
    assert store.leases is not None
    for _ in range(200):
        if any(store.leases.held().values()):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no lease was granted")


async def first_lease(store: RedisStore, counters: list[Counter]) -> None:
    """One call reserved in Redis and settled at ``CALL`` (the store asks for a
    lease on its kind), then wait for the lease."""
    await store.reserve("first", CALL, counters, [], 30)
    await store.settle("first", CALL, [TEAM], None, USAGE)
    await until_leased(store)


def script_calls(client: redis.Redis) -> int:
    stats: Any = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def test_calls_served_from_a_lease_skip_the_round_trip_and_are_all_charged(url: str) -> None:
    client = redis.Redis.from_url(url, decode_responses=True)
    counters = [Counter(TEAM, 10**12)]
    buckets = [Bucket("key:k1:rpm", 1_000_000, 1), Bucket("key:k1:tpm", 10**9, 500)]

    async def main() -> tuple[int, Any, Any, Any]:
        async with leasing(url) as s:
            await s.reserve("first", CALL, counters, buckets, 30)  # in Redis; asks for a lease
            await s.settle("first", CALL, [TEAM], 100, USAGE)
            await until_leased(s)
            client.config_resetstat()
            granted = []
            for i in range(6):
                granted.append(await s.reserve(f"r{i}", CALL, counters, buckets, 30))
                await s.settle(f"r{i}", CALL, [TEAM], 100, USAGE)
            await s.drain()
            calls = script_calls(client)
            during = await s.spent([TEAM])
        after = RedisStore(url)
        try:
            rows = await after.report()
            return calls, granted, during, await after.spent([TEAM]), rows
        finally:
            await after.close()

    try:
        calls, granted, during, after, rows = run(main())
    finally:
        client.close()
    # the report counts each call once, charged together or not
    summary = [(r.team, r.calls, r.cost, r.prompt_tokens) for r in rows]
    assert summary == [("alpha", 7, 7 * CALL, 70)]
    assert all(isinstance(g, Granted) for g in granted)
    assert calls <= 3  # the six calls' charges, in a batch or a few; no reserve of their own
    spent, reserved = during[TEAM]
    assert spent == 7 * CALL
    assert reserved > 0  # the lease
    assert after == {TEAM: (7 * CALL, 0)}  # closing gave the lease back
    # the headers' view: what the budget had committed, what the bucket has left
    assert granted[-1].committed[TEAM] >= 7 * CALL
    assert 0 < granted[-1].buckets["key:k1:tpm"].remaining < 10**9


def test_a_lease_topped_up_often_grows_so_top_ups_stay_rare(url: str, tmp_path: Path) -> None:
    """One caller at a time (each top-up's reply arrives before the lease runs
    dry, so it never finds it dry): a lease sized for 8 calls would need a
    top-up every 4 or 5 calls. One topped up again within a second doubles
    (up to 16 times its first size), so the top-ups become rare."""
    client = redis.Redis.from_url(url, decode_responses=True)
    counters = [Counter(TEAM, 10**15)]

    async def main() -> tuple[int, int, int]:
        async with leasing(url, outbox_dir=tmp_path) as s:
            await first_lease(s, counters)
            await s.drain()
            client.config_resetstat()
            for i in range(600):
                await s.reserve(f"r{i}", CALL, counters, [], 30)
                await s.settle(f"r{i}", CALL, [TEAM], None, USAGE)
                await asyncio.sleep(0.0005)  # the next call comes after a reply could
            await s.drain()
            assert s.leases is not None
            (lease,) = s.leases._by_shape.values()
            return script_calls(client), lease.calls, s.leases.missed

    try:
        calls, size, missed = run(main())
    finally:
        client.close()
    assert (size, missed) == (8 * 16, 0)
    # top-ups at the first size alone: 600 / 4.5 = 133; charges go every 10 ms
    assert calls < 100


def test_a_budget_near_its_limit_is_never_leased(url: str) -> None:
    # room for 50 calls; a lease of 8 calls needs room for 10 x 8
    counters = [Counter(TEAM, 50 * CALL)]

    async def main() -> list[Any]:
        async with leasing(url) as s:
            results = await asyncio.gather(
                *(s.reserve(f"r{i}", CALL, counters, [], 30) for i in range(60))
            )
            await asyncio.sleep(0.05)
            assert s.leases is not None
            return [results, s.leases.held(), await s.spent([TEAM])]

    results, held, spent = run(main())
    assert sum(isinstance(r, Granted) for r in results) == 50
    assert all(r.kind == "budget" for r in results if isinstance(r, Denied))
    assert held == {}
    assert spent == {TEAM: (0, 50 * CALL)}


async def seven_before_the_lease(url: str, limit: int) -> tuple[list[Any], int, Any]:
    """One call reserved in Redis (it asks for a lease, headroom 2), then seven
    more at once, sent before the lease comes back: their results, how many
    were served from the lease, and the budget's (spent, reserved)."""
    counters = [Counter(TEAM, limit)]
    async with leasing(url, lease_headroom=2) as s:
        assert s.leases is not None
        await s.reserve("first", CALL, counters, [], 30)
        results = await asyncio.gather(
            *(s.reserve(f"r{i}", CALL, counters, [], 30) for i in range(7))
        )
        return results, s.leases.served, await s.spent([TEAM])


def test_a_call_redis_refuses_is_served_from_a_lease_granted_meanwhile(url: str) -> None:
    # room for 7 calls: the first goes to Redis and asks for a lease, which
    # gets half the room left (headroom 2): 3 calls; the next seven, sent
    # before the lease came back, go to Redis: 3 fit there, and 3 of the 4 it
    # refuses fit in this replica's own lease, so the budget is used to the end
    results, from_lease, spent = run(seven_before_the_lease(url, 7 * CALL))
    assert sum(isinstance(r, Granted) for r in results) == 6
    assert [r.kind for r in results if isinstance(r, Denied)] == ["budget"]
    assert from_lease == 3
    assert spent == {TEAM: (0, 7 * CALL)}


def test_a_lease_remnant_goes_back_for_a_call_redis_refused(url: str) -> None:
    # room for 6 calls: the lease granted after the first gets 2.5 calls; of
    # the seven calls sent before it came back, Redis takes 2 and refuses 5; 2
    # of those are served from the lease, and the half call left in it goes
    # back so that, with the half call left in Redis, one more fits
    results, from_lease, spent = run(seven_before_the_lease(url, 6 * CALL))
    assert sum(isinstance(r, Granted) for r in results) == 5
    assert from_lease == 2
    assert spent == {TEAM: (0, 6 * CALL)}


def test_a_lease_remnant_smaller_than_a_call_goes_back_before_the_call(url: str) -> None:
    # room for 6 calls: the lease gets half the room left after the first
    # (2.5 calls); the half call it keeps once two calls used it must not keep
    # the last call that fits from being served
    counters = [Counter(TEAM, 6 * CALL)]

    async def main() -> tuple[list[Any], Any]:
        async with leasing(url, lease_headroom=2) as s:
            await first_lease(s, counters)
            results = []
            for i in range(7):
                results.append(await s.reserve(f"r{i}", CALL, counters, [], 30))
            return results, await s.spent([TEAM])

    results, spent = run(main())
    assert [isinstance(r, Granted) for r in results] == [True] * 5 + [False] * 2
    assert spent == {TEAM: (CALL, 5 * CALL)}


def test_two_leasing_replicas_hold_the_limit_and_use_all_of_it(url: str) -> None:
    limit = 2_000 * CALL  # leases while there is room for 80 calls, exact after that
    counters = [Counter(TEAM, limit)]

    async def worker(s: RedisStore, name: str, served: list[int]) -> None:
        i, refused_since = 0, None
        while True:
            i += 1
            rid = f"{name}-{i}"
            r = await s.reserve(rid, CALL, counters, [], 30)
            if isinstance(r, Denied):
                now = time.monotonic()
                refused_since = refused_since or now
                if now - refused_since > 0.3:  # the other replica's lease had time to come back
                    return
                await asyncio.sleep(0.005)
                continue
            refused_since = None
            await asyncio.sleep(0)
            await s.settle(rid, CALL, [TEAM], None, USAGE)
            served.append(1)

    async def main() -> tuple[int, list[int], Any]:
        served: list[int] = []
        async with leasing(url) as a, leasing(url) as b:
            await asyncio.gather(
                *(
                    worker(s, f"{name}{w}", served)
                    for s, name in ((a, "a"), (b, "b"))
                    for w in range(4)
                )
            )
            assert a.leases is not None and b.leases is not None
            from_leases = [a.leases.served, b.leases.served]
        check = RedisStore(url)
        try:
            return len(served), from_leases, await check.spent([TEAM])
        finally:
            await check.close()

    served, from_leases, spent = run(main())
    assert spent == {TEAM: (limit, 0)}
    assert served == limit // CALL
    assert min(from_leases) > 200  # both replicas served most of their calls from leases


def test_a_released_call_gives_its_reservation_back_to_the_lease(url: str) -> None:
    counters = [Counter(TEAM, 10**12)]

    async def main() -> tuple[int, int]:
        async with leasing(url) as s:
            await s.reserve("first", CALL, counters, [], 30)
            await s.release("first")
            await until_leased(s)
            assert s.leases is not None
            before = s.leases.held()[TEAM]
            await s.reserve("r", CALL, counters, [], 30)
            assert s.leases.held()[TEAM] == before - CALL
            await s.release("r")
            return before, s.leases.held()[TEAM]

    before, after = run(main())
    assert after == before


def test_a_lease_its_replica_abandons_expires(url: str) -> None:
    counters = [Counter(TEAM, 10**12)]

    async def main() -> list[Any]:
        s = RedisStore(url, lease_calls=8, lease_headroom=10, lease_ttl_s=0.5)
        await first_lease(s, counters)
        await s.reserve("stranded", CALL, counters, [], 30)  # in flight when it "dies"
        assert s.leases is not None and s.leases._keeper is not None
        s.leases._keeper.cancel()  # killed: nobody keeps the lease alive or gives it back
        await s.drain()
        other = RedisStore(url)
        try:
            while_held = await other.spent([TEAM])
            await asyncio.sleep(0.8)
            return [while_held, await other.spent([TEAM])]
        finally:
            await other.close()
            await s._batch.close()

    while_held, expired = run(main())
    assert while_held[TEAM][0] == CALL and while_held[TEAM][1] >= 8 * CALL
    assert expired == {TEAM: (CALL, 0)}


def test_a_rate_limit_is_leased_only_with_room_and_never_exceeded(url: str) -> None:
    # 1,000 requests a minute; a lease of 8 needs 80 left in the bucket
    counters = [Counter(TEAM, 10**12)]
    buckets = [Bucket("key:k1:rpm", 1_000, 1)]

    async def main() -> int:
        async with leasing(url) as a, leasing(url) as b:
            served = 0
            for i in range(1_100):
                s = a if i % 2 else b
                r = await s.reserve(f"r{i}", CALL, counters, buckets, 30)
                if isinstance(r, Granted):
                    served += 1
                    await s.settle(f"r{i}", CALL, [TEAM], None, USAGE)
            assert a.leases is not None and b.leases is not None
            assert min(a.leases.served, b.leases.served) > 20
            return served

    start = time.monotonic()
    served = run(main())
    refilled = (time.monotonic() - start) * 1_000 / 60
    assert 1_000 - 2 * 8 <= served <= 1_000 + refilled + 1


def test_an_idle_lease_is_given_back(url: str) -> None:
    counters = [Counter(TEAM, 10**12)]

    async def main() -> list[Any]:
        async with leasing(url) as s:
            await first_lease(s, counters)
            leased = await s.spent([TEAM])
            assert s.leases is not None
            s.leases.tend(time.monotonic() + s.leases.idle_s + 1)  # the keeper, later
            await s.drain()
            return [leased, s.leases.open(), await s.spent([TEAM])]

    leased, still_open, after = run(main())
    assert leased[TEAM][1] > 0
    assert still_open == 0
    assert after == {TEAM: (CALL, 0)}


def test_a_lease_with_a_call_in_flight_is_kept_alive_past_its_ttl(url: str) -> None:
    counters = [Counter(TEAM, 10**12)]

    async def main() -> list[Any]:
        async with leasing(url, lease_ttl_s=0.6) as s:
            await first_lease(s, counters)
            assert s.leases is not None
            s.leases.idle_s = 0.1  # idle, but a call is in flight: kept, not given back
            granted = await s.reserve("long", CALL, counters, [], 30)
            assert isinstance(granted, Granted) and s.leases.served == 1
            await asyncio.sleep(1.5)  # 2.5 TTLs
            during = await s.spent([TEAM])
            await s.settle("long", 3 * CALL, [TEAM], None, USAGE)
            await asyncio.sleep(0.3)  # the keeper's next pass gives the lease back
            return [during, s.leases.expired, await s.spent([TEAM])]

    during, expired, after = run(main())
    assert during[TEAM][1] >= CALL  # still reserved for the call in flight
    assert expired == 0
    assert after == {TEAM: (4 * CALL, 0)}


def test_a_lost_connection_ends_the_leases(url: str) -> None:
    counters = [Counter(TEAM, 10**12)]

    async def main() -> list[Any]:
        async with leasing(url) as s:
            await first_lease(s, counters)
            assert s.leases is not None
            served = s.leases.served
            killer = redis.asyncio.Redis.from_url(url)
            await killer.client_kill_filter(_type="normal", skipme=True)
            await killer.aclose()
            await asyncio.sleep(0.05)
            still_open = s.leases.open()
            after = await s.reserve("after", CALL, counters, [], 30)  # reconnects: in Redis
            return [still_open, s.leases.served - served, after]

    still_open, served_since, after = run(main())
    assert still_open == 0
    assert served_since == 0
    assert isinstance(after, Granted)


def test_all_leases_on_a_budget_hold_at_most_its_share_of_the_room(url: str) -> None:
    # 40 kinds of call (40 keys) share one team budget with room for 2,000
    # calls: one 16-call lease each would hold 640 calls' worth; together they
    # may hold 1/10 of the room, 200
    limit = 2_000 * CALL

    async def main() -> list[Any]:
        async with leasing(url) as s:
            for k in range(40):
                counters = [Counter(TEAM, limit), Counter(f"key:k{k}:day:2026-11-29", 10**12)]
                await s.reserve(f"first{k}", CALL, counters, [], 30)
                await s.settle(f"first{k}", CALL, [TEAM, f"key:k{k}:day:2026-11-29"], None, USAGE)
                await asyncio.sleep(0.005)
            await s.drain()
            assert s.leases is not None
            return [await s.spent([TEAM]), s.leases.open()]

    spent, leases = run(main())
    held = spent[TEAM][1]
    assert spent[TEAM][0] == 40 * CALL
    assert 0 < held <= limit // 10  # one lease per kind alone would hold 640 calls
    assert leases >= 10  # granted while there was room for them
