"""The Redis store against a real ``redis-server`` (the ``redis_server``
fixture of :mod:`veil.testing`; skipped when it is not installed): the
reserve / settle / release arithmetic, all-or-nothing refusals, token
buckets, expiry, concurrency within and across replicas, the spend report,
resets, the key layout and failures."""

from __future__ import annotations

import asyncio
import datetime
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.exceptions
from budgettest import run

from veil.testing import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veil_budget.redis_store import RedisStore  # noqa: E402
from veil_budget.store import (  # noqa: E402
    Bucket,
    Counter,
    Denied,
    Granted,
    SpendRow,
    Usage,
)

USAGE = Usage("alpha", "k1", "ann", "gpt-4o", prompt_tokens=10, completion_tokens=5)


@asynccontextmanager
async def opened(url: str, prefix: str = "veil:budget") -> AsyncIterator[RedisStore]:
    store = RedisStore(url, prefix=prefix)
    try:
        yield store
    finally:
        await store.close()


async def server_day(store: RedisStore) -> str:
    seconds, _ = await store.client.time()
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).date().isoformat()


def test_reserve_settle_and_release_keep_the_arithmetic(url: str) -> None:
    async def main() -> None:
        async with opened(url) as s:
            counters = [Counter("team:alpha", 1000), Counter("key:k1", 5000)]
            assert await s.reserve("r1", 300, counters, [], 30) == Granted(
                {"team:alpha": 300, "key:k1": 300}, {}
            )
            granted = await s.reserve("r2", 200, counters[:1], [], 30)
            assert granted == Granted({"team:alpha": 500}, {})
            await s.settle("r1", 120, ["team:alpha", "key:k1"], None, USAGE)
            assert await s.spent(["team:alpha", "key:k1", "nothing"]) == {
                "team:alpha": (120, 200),
                "key:k1": (120, 0),
                "nothing": (0, 0),
            }
            await s.release("r2")
            await s.release("r2")  # twice: nothing happens
            await s.release("unknown")
            assert await s.spent(["team:alpha", "key:k1"]) == {
                "team:alpha": (120, 0),
                "key:k1": (120, 0),
            }
            # a zero-amount reservation and a zero-cost settle change no total
            assert await s.reserve("r3", 0, counters, [], 30) == Granted(
                {"team:alpha": 120, "key:k1": 120}, {}
            )
            await s.settle("r3", 0, ["team:alpha"], None, USAGE)
            assert await s.spent(["team:alpha"]) == {"team:alpha": (120, 0)}

    run(main())


def test_token_buckets_get_back_the_unused_take_and_request_buckets_do_not(url: str) -> None:
    def buckets(take: int) -> list[Bucket]:
        return [Bucket("tpm:k1", 1000, take, 3600.0), Bucket("rpm:k1", 10, 1, 3600.0)]

    async def remaining(s: RedisStore, rid: str, take: int) -> dict[str, int]:
        granted = await s.reserve(rid, 0, [], buckets(take), 30)
        assert isinstance(granted, Granted)
        return {k: v.remaining for k, v in granted.buckets.items()}

    async def main() -> None:
        async with opened(url) as s:
            granted = await s.reserve("r1", 0, [], buckets(300), 30)
            assert isinstance(granted, Granted)
            assert granted.buckets["tpm:k1"].remaining == 700
            assert granted.buckets["rpm:k1"].remaining == 9
            assert granted.buckets["tpm:k1"].reset_s == pytest.approx(300 * 3.6, abs=1)
            assert granted.buckets["rpm:k1"].reset_s == pytest.approx(360, abs=1)
            await s.settle("r1", 0, [], 100, USAGE)  # used 100 of 300: 200 come back
            assert await remaining(s, "r2", 300) == {"tpm:k1": 600, "rpm:k1": 8}
            await s.settle("r2", 0, [], 500, USAGE)  # used 500 of 300: 200 more go
            assert await remaining(s, "r3", 300) == {"tpm:k1": 100, "rpm:k1": 7}
            await s.release("r3")  # the whole take comes back, not the request
            assert await remaining(s, "r4", 300) == {"tpm:k1": 100, "rpm:k1": 6}
            await s.settle("r4", 0, [], None, USAGE)  # unknown count: keep the take
            assert await remaining(s, "r5", 0) == {"tpm:k1": 100, "rpm:k1": 5}
            await s.settle("r5", 0, [], 0, USAGE)
            # giving back never fills a bucket past its capacity
            await s.reserve("r6", 0, [], [Bucket("tpm:k2", 100, 50, 3600.0)], 30)
            await s.settle("r6", 0, [], -500, USAGE)
            granted = await s.reserve("r7", 0, [], [Bucket("tpm:k2", 100, 100, 3600.0)], 30)
            assert isinstance(granted, Granted)
            state = granted.buckets["tpm:k2"]
            assert state.remaining == 0 and state.reset_s == pytest.approx(3600, abs=1)

    run(main())


def test_a_refused_reservation_takes_nothing(url: str) -> None:
    async def main() -> None:
        async with opened(url) as s:
            await s.reserve("r0", 80, [Counter("team:alpha", 100)], [], 30)
            await s.settle("r0", 80, ["team:alpha"], None, USAGE)
            counters = [Counter("key:k1", 1000), Counter("team:alpha", 100)]
            bucket = Bucket("tpm:k1", 5, 2, 3600.0)
            assert await s.reserve("r1", 30, counters, [bucket], 30) == Denied(
                "budget", "team:alpha", None, 80
            )
            # a bucket refuses: the counters and the other bucket keep everything
            tight = Bucket("rpm:k1", 1, 2, 3600.0)
            denied = await s.reserve("r2", 10, counters, [bucket, tight], 30)
            assert isinstance(denied, Denied)
            assert (denied.kind, denied.key, denied.committed) == ("rate", "rpm:k1", 0)
            assert denied.retry_after_s == pytest.approx(3600, abs=1)
            assert await s.spent(["key:k1", "team:alpha"]) == {
                "key:k1": (0, 0),
                "team:alpha": (80, 0),
            }
            granted = await s.reserve("r3", 20, counters, [bucket], 30)
            assert isinstance(granted, Granted)
            assert granted.committed == {"key:k1": 20, "team:alpha": 100}
            assert granted.buckets["tpm:k1"].remaining == 3
            # a refused rid leaves no reservation behind
            await s.release("r1")
            await s.release("r2")
            assert await s.spent(["team:alpha"]) == {"team:alpha": (80, 20)}

    run(main())


def test_a_counter_listed_twice_is_checked_against_the_smaller_limit(url: str) -> None:
    async def main() -> None:
        async with opened(url) as s:
            twice = [Counter("team:alpha", 100), Counter("team:alpha", 50)]
            assert await s.reserve("r1", 60, twice, [], 30) == Denied(
                "budget", "team:alpha", None, 0
            )
            twice = [Counter("team:alpha", 100), Counter("team:alpha", 70)]
            assert await s.reserve("r2", 60, twice, [], 30) == Granted({"team:alpha": 60}, {})
            assert await s.spent(["team:alpha"]) == {"team:alpha": (0, 60)}  # reserved once
            await s.settle("r2", 10, ["team:alpha", "team:alpha"], None, USAGE)
            assert await s.spent(["team:alpha"]) == {"team:alpha": (10, 0)}  # committed once

    run(main())


def test_a_bucket_listed_twice_adds_its_takes(url: str) -> None:
    async def main() -> None:
        async with opened(url) as s:
            twice = [Bucket("tpm:k1", 100, 40, 3600.0), Bucket("tpm:k1", 100, 40, 3600.0)]
            granted = await s.reserve("r1", 0, [], twice, 30)
            assert isinstance(granted, Granted)
            assert granted.buckets["tpm:k1"].remaining == 20
            denied = await s.reserve("r2", 0, [], twice, 30)
            assert isinstance(denied, Denied) and denied.kind == "rate"
            await s.release("r1")
            granted = await s.reserve("r3", 0, [], [Bucket("tpm:k1", 100, 100, 3600.0)], 30)
            assert isinstance(granted, Granted)

    run(main())


def test_a_call_s_shape_worked_out_once_follows_its_counters_and_buckets(url: str) -> None:
    async def main() -> None:
        async with opened(url) as s:
            counters = [Counter("team:alpha", 1000)]
            rpm = [Bucket("rpm:k1", 100, 1, 60.0)]
            for rid in ("r1", "r2"):  # the second from what the first worked out
                assert isinstance(await s.reserve(rid, 10, counters, rpm, 30), Granted)
            counters[0] = Counter("team:alpha", 25)  # the same list, a lower limit
            denied = await s.reserve("r3", 10, counters, rpm, 30)
            assert isinstance(denied, Denied) and (denied.kind, denied.key) == (
                "budget",
                "team:alpha",
            )
            with pytest.raises(ValueError, match="take"):
                await s.reserve("r4", 1, counters, [Bucket("rpm:k1", 100, -1, 60.0)], 30)
            granted = await s.reserve("r5", 1, counters, [Bucket("rpm:k1", 100, 2, 60.0)], 30)
            assert isinstance(granted, Granted) and granted.buckets["rpm:k1"].remaining == 96

    run(main())


def test_a_bucket_refuses_with_a_retry_after_and_refills(url: str) -> None:
    bucket = Bucket("rpm:k1", 2, 1, 1.0)  # 2 per second

    async def main() -> None:
        async with opened(url) as s:
            first = await s.reserve("r1", 0, [], [bucket], 30)
            assert isinstance(first, Granted)
            assert first.buckets["rpm:k1"].remaining == 1
            assert first.buckets["rpm:k1"].reset_s == pytest.approx(0.5, abs=0.05)
            assert isinstance(await s.reserve("r2", 0, [], [bucket], 30), Granted)
            denied = await s.reserve("r3", 0, [], [bucket], 30)
            assert isinstance(denied, Denied)
            assert (denied.kind, denied.key) == ("rate", "rpm:k1")
            assert denied.retry_after_s is not None
            assert 0.3 < denied.retry_after_s <= 0.5
            await asyncio.sleep(denied.retry_after_s + 0.05)
            assert isinstance(await s.reserve("r4", 0, [], [bucket], 30), Granted)
            assert isinstance(await s.reserve("r5", 0, [], [bucket], 30), Denied)

    run(main())


def test_an_expired_reservation_comes_back_by_itself(url: str) -> None:
    counter = Counter("team:alpha", 100)
    bucket = Bucket("tpm:k1", 100, 50, 3600.0)

    async def main() -> None:
        async with opened(url) as s:
            assert isinstance(await s.reserve("r1", 80, [counter], [bucket], 0.2), Granted)
            assert await s.reserve("r2", 30, [counter], [bucket], 30) == Denied(
                "budget", "team:alpha", None, 80
            )
            await asyncio.sleep(0.3)
            assert await s.spent(["team:alpha"]) == {"team:alpha": (0, 0)}
            granted = await s.reserve("r3", 30, [counter], [bucket], 30)
            assert isinstance(granted, Granted)
            assert granted.committed == {"team:alpha": 30}
            assert granted.buckets["tpm:k1"].remaining == 50  # r1's take came back
            await s.release("r1")  # expired: nothing happens, nothing comes back twice
            granted = await s.reserve("r4", 30, [counter], [bucket], 30)
            assert isinstance(granted, Granted)
            assert granted.committed == {"team:alpha": 60}
            assert granted.buckets["tpm:k1"].remaining == 0

    run(main())


def test_a_settle_after_expiry_still_commits_the_cost(url: str) -> None:
    async def main() -> None:
        async with opened(url) as s:
            await s.reserve("r1", 80, [Counter("team:alpha", 100)], [], 0.2)
            await asyncio.sleep(0.3)
            await s.settle("r1", 70, ["team:alpha"], 10, USAGE)
            assert await s.spent(["team:alpha"]) == {"team:alpha": (70, 0)}
            [row] = await s.report()
            assert (row.cost, row.calls) == (70, 1)

    run(main())


@pytest.mark.parametrize("replicas", [1, 2])
def test_concurrent_reserves_never_overshoot(url: str, replicas: int) -> None:
    amount = 7
    counter = Counter("team:alpha", 50 * amount)

    async def main() -> None:
        stores = [RedisStore(url) for _ in range(replicas)]
        try:
            results = await asyncio.gather(
                *(
                    stores[i % replicas].reserve(f"r{i}", amount, [counter], [], 30)
                    for i in range(200)
                )
            )
            granted = [r for r in results if isinstance(r, Granted)]
            denied = [r for r in results if isinstance(r, Denied)]
            assert len(granted) == 50 and len(denied) == 150
            assert {d.kind for d in denied} == {"budget"}
            assert max(g.committed["team:alpha"] for g in granted) == 50 * amount
            assert await stores[0].spent(["team:alpha"]) == {"team:alpha": (0, 50 * amount)}
        finally:
            for store in stores:
                await store.close()

    run(main())


def test_the_report_sums_settled_calls_per_day_team_key_user_and_model(url: str) -> None:
    odd = Usage("beta", "k2", "a\x1fb ü \"'", "m:1", prompt_tokens=1, completion_tokens=2)

    async def main() -> None:
        async with opened(url) as s:
            await s.settle("r1", 100, ["team:alpha"], None, USAGE)
            await s.settle("r2", 50, ["team:alpha"], None, USAGE)
            await s.settle("r3", 7, ["team:beta"], None, odd)
            day = await server_day(s)
            rows = [
                SpendRow(day, "alpha", "k1", "ann", "gpt-4o", 150, 2, 20, 10),
                SpendRow(day, "beta", "k2", "a\x1fb ü \"'", "m:1", 7, 1, 1, 2),
            ]
            assert await s.report() == rows
            assert await s.report(day) == rows
            assert await s.report(day[:7]) == rows  # compared as strings
            assert await s.report("9999-01-01") == []

    run(main())


def test_reset_zeroes_the_spent_of_matching_counters(url: str) -> None:
    keys = ["team:alpha:month:2026-11", "team:beta:month:2026-11", "key:k1:month:2026-11"]

    async def main() -> None:
        async with opened(url) as s, opened(url, prefix="other") as other:
            for key in keys:
                await s.settle("r", 10, [key], None, USAGE)
            await other.settle("r", 10, [keys[0]], None, USAGE)
            await s.reserve("r1", 5, [Counter(keys[0], 100)], [], 30)
            await s.reserve("r2", 5, [Counter("team:gamma:month:2026-11", 100)], [], 30)
            assert await s.reset("team:*:month:2026-11") == 2
            assert await s.spent(keys) == {keys[0]: (0, 5), keys[1]: (0, 0), keys[2]: (10, 0)}
            assert await s.reset("team:*") == 0  # already 0
            assert await s.reset("key:k?:month:*") == 1
            assert await other.spent([keys[0]]) == {keys[0]: (10, 0)}  # another prefix
            await s.settle("r1", 3, [keys[0]], None, USAGE)
            assert await s.spent([keys[0]]) == {keys[0]: (3, 0)}

    run(main())


def test_amounts_beyond_two_to_the_53_stay_exact(url: str) -> None:
    big = 2**62
    counter = Counter("org", big + 3)

    async def main() -> None:
        async with opened(url) as s:
            assert await s.reserve("r1", big, [counter], [], 30) == Granted({"org": big}, {})
            assert await s.reserve("r2", 3, [counter], [], 30) == Granted({"org": big + 3}, {})
            assert await s.reserve("r3", 1, [counter], [], 30) == Denied(
                "budget", "org", None, big + 3
            )
            await s.settle("r1", big - 1, ["org"], None, USAGE)
            assert await s.spent(["org"]) == {"org": (big - 1, 3)}
            assert await s.reserve("r4", 1, [counter], [], 30) == Granted({"org": big + 3}, {})

    run(main())


def test_a_rid_reserved_twice_is_taken_once(url: str) -> None:
    async def main() -> None:
        async with opened(url) as s:
            counter, bucket = Counter("team:alpha", 100), Bucket("tpm:k1", 100, 30, 3600.0)
            first = await s.reserve("r1", 40, [counter], [bucket], 30)
            again = await s.reserve("r1", 40, [counter], [bucket], 30)
            assert isinstance(first, Granted) and isinstance(again, Granted)
            assert first.committed == again.committed == {"team:alpha": 40}
            assert first.buckets["tpm:k1"].remaining == again.buckets["tpm:k1"].remaining == 70
            await s.release("r1")
            assert await s.spent(["team:alpha"]) == {"team:alpha": (0, 0)}

    run(main())


def test_every_key_shares_one_hash_tag_and_only_what_may_go_expires(url: str) -> None:
    async def main() -> str:
        async with opened(url) as s:
            await s.reserve("r1", 5, [Counter("team:{x}", 100)], [Bucket("t", 10, 2, 60.0)], 30)
            await s.reserve("r2", 5, [Counter("team:{x}", 100)], [], 30)
            await s.settle("r2", 5, ["team:{x}"], 1, USAGE)
            return await server_day(s)

    day = run(main())
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        base = "veil:budget:{b}:"
        assert sorted(client.keys("*")) == [
            base + "c:team:{x}",
            base + f"day:{day}",
            base + "days",
            base + "expiry",
            base + "r:r1",
            base + "t:t",
        ]
        assert client.ttl(base + "c:team:{x}") == -1  # spend survives
        assert client.ttl(base + "r:r1") == -1  # only the expiry sweep removes it
        assert client.ttl(base + "days") == -1
        assert 399 * 86400 < client.ttl(base + f"day:{day}") <= 400 * 86400
        assert 0 < client.pttl(base + "t:t") <= 13_000  # gone once it would be full
    finally:
        client.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisStore("redis://127.0.0.1:1/0", prefix="x:{y}")

    async def main() -> None:
        async with opened("redis://127.0.0.1:1/0") as s:
            with pytest.raises(ValueError):
                await s.reserve("r", -1, [], [], 30)
            with pytest.raises(ValueError):
                await s.reserve("r", 1, [], [], 0)
            with pytest.raises(ValueError):
                await s.reserve("r", 1, [], [Bucket("b", 0, 1, 60.0)], 30)
            with pytest.raises(ValueError):
                await s.settle("r", -1, [], None, USAGE)

    run(main())


def test_an_unreachable_redis_raises() -> None:
    async def main() -> None:
        async with opened(f"redis://127.0.0.1:{free_port()}/0") as s:
            failed: list[int] = []
            s.settle_failed = lambda: failed.append(1)
            await s.settle("r", 1, ["c"], None, USAGE)  # queued; reported when it fails
            await asyncio.sleep(0.2)
            assert failed == [1]
            calls = [
                s.reserve("r", 1, [Counter("c", 10)], [Bucket("b", 10, 1, 60.0)], 30),
                s.release("r"),
                s.spent(["c"]),
                s.report(),
                s.reset("*"),
            ]
            for call in calls:
                with pytest.raises(redis.exceptions.ConnectionError):
                    await call

    run(main())


def test_one_turns_operations_go_to_redis_as_one_script_call(url: str) -> None:
    async def main() -> list[Any]:
        async with opened(url) as s:
            await s.reserve("warm", 0, [], [], 30)  # connects
            calls = [
                s.reserve(f"r{i}", 10, [Counter("team:alpha", 10_000)], [], 30) for i in range(40)
            ]
            granted = await asyncio.gather(*calls)
            await asyncio.gather(
                *(s.settle(f"r{i}", 5, ["team:alpha"], None, USAGE) for i in range(40))
            )
            return [granted, await s.spent(["team:alpha"])]

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        client.config_resetstat()
        granted, spent = run(main())
        stats = client.info("commandstats")
        script_calls = sum(
            v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
        )
    finally:
        client.close()
    # every reserve saw the ones before it (one atomic script, in order)
    assert sorted(g.committed["team:alpha"] for g in granted) == [10 * i for i in range(1, 41)]
    assert spent == {"team:alpha": (200, 0)}
    assert script_calls <= 6  # warm-up, 40 reserves, 40 settles, spent: a few batches


def test_a_flushed_script_cache_is_refilled_without_running_twice(url: str) -> None:
    async def main() -> dict[str, tuple[int, int]]:
        async with opened(url) as s:
            await s.reserve("r1", 10, [Counter("team:alpha", 100)], [], 30)
            client = redis.asyncio.Redis.from_url(url)
            await client.script_flush()
            await client.aclose()
            await s.settle("r1", 7, ["team:alpha"], None, USAGE)  # NOSCRIPT, then EVAL
            return await s.spent(["team:alpha"])

    assert run(main()) == {"team:alpha": (7, 0)}


def test_a_redis_that_stops_answering_times_out_and_the_next_call_reconnects(
    url: str,
) -> None:
    async def main() -> None:
        store = RedisStore(url, timeout_s=0.3)
        try:
            await store.reserve("r0", 1, [Counter("c", 100)], [], 30)
            client = redis.asyncio.Redis.from_url(url)
            await client.execute_command("CLIENT", "PAUSE", "1000", "ALL")  # Redis hangs 1 s
            await client.aclose()
            with pytest.raises(redis.exceptions.TimeoutError):
                await store.reserve("r1", 1, [Counter("c", 100)], [], 30)
            await asyncio.sleep(1)
            granted = await store.reserve("r2", 1, [Counter("c", 100)], [], 30)
            assert isinstance(granted, Granted)
        finally:
            await store.close()

    run(main())


def test_a_lost_connection_fails_the_calls_in_flight_and_then_reconnects(url: str) -> None:
    async def main() -> None:
        async with opened(url) as s:
            await s.reserve("r0", 1, [Counter("c", 100)], [], 30)
            client = redis.asyncio.Redis.from_url(url)
            await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            await client.aclose()
            await asyncio.sleep(0.05)
            granted = await s.reserve("r1", 1, [Counter("c", 100)], [], 30)
            assert isinstance(granted, Granted) and granted.committed == {"c": 2}

    run(main())
