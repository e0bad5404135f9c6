"""The Redis store's outbox (see :mod:`veil_budget.redis_outbox`): settles a
killed process had not sent yet are sent by the next one, settles whose
sending failed are sent again once Redis takes them, acknowledged ones never
twice; one slot per live process, orphans taken over once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from budgettest import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veil_budget import redis_store  # noqa: E402
from veil_budget.redis_outbox import Outbox  # noqa: E402
from veil_budget.redis_store import RedisStore  # noqa: E402
from veil_budget.store import Counter, Usage  # noqa: E402

from veil.testing import RedisServer  # noqa: E402

PLUGIN = Path(__file__).resolve().parents[1]
TEAM = "team:alpha:month:2026-12"
CALL = 1_000
USAGE = Usage("alpha", "k1", "", "gpt-4o", prompt_tokens=10, completion_tokens=5)


def _op(n: int) -> bytes:
    return b'["s","r%d","1","",["team:a"],"f",1,1]' % n


KILL = "os.kill(os.getpid(), signal.SIGKILL)"


def _killed(script: str, *args: str) -> None:
    """Run ``script`` (it ends with ``KILL``) in a Python process; it must die of SIGKILL."""
    code = "import os, signal\n" + textwrap.dedent(script)
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(PLUGIN)},
    )
    assert out.returncode == -9, out.stderr


def test_a_killed_process_leaves_exactly_its_unacknowledged_settles(tmp_path: Path) -> None:
    _killed(
        """
        import sys
        from pathlib import Path
        from veil_budget.redis_outbox import Outbox

        box = Outbox(Path(sys.argv[1]))
        ids = [box.add(b'["s","r%d","1","",["team:a"],"f",1,1]' % n) for n in range(5)]
        box.ack([ids[0], ids[2]])
        """
        + KILL,
        str(tmp_path),
    )
    box = Outbox(tmp_path)
    try:
        due = box.due()
        assert [op for _, op in due] == [_op(1), _op(3), _op(4)]
        assert box.unacked() == 3
        assert box.due() == []  # handed out once
    finally:
        box.close()
    # a reply that comes back after close changes nothing (the file is closed)
    box.ack([due[0][0]])
    assert box.add(_op(9)) == 0
    again = Outbox(tmp_path)  # a clean close keeps what Redis did not acknowledge
    try:
        assert [op for _, op in again.due()] == [_op(1), _op(3), _op(4)]
    finally:
        again.close()


def test_live_outboxes_keep_their_slots_and_an_orphan_is_taken_over_once(tmp_path: Path) -> None:
    first = Outbox(tmp_path)
    first.add(_op(1))
    second = Outbox(tmp_path)
    try:
        assert (first.path.name, second.path.name) == ("budget-outbox.0", "budget-outbox.1")
        assert second.due() == []  # a live process's settles are its own
        first.close()  # now an orphan, with one settle unacknowledged
        third = Outbox(tmp_path)
        try:
            assert third.path == first.path
            due = third.due()
            assert [op for _, op in due] == [_op(1)]
            third.ack([i for i, _ in due])
            assert third.unacked() == 0
        finally:
            third.close()
        fourth = Outbox(tmp_path)
        try:
            assert fourth.due() == []
        finally:
            fourth.close()
    finally:
        second.close()


def test_an_orphan_is_emptied_once_its_settles_are_copied(tmp_path: Path) -> None:
    holder = Outbox(tmp_path)  # takes slot 0, so the orphan below is slot 1
    orphan = Outbox(tmp_path)
    orphan.add(_op(7))
    orphan.close()
    holder.close()
    taker = Outbox(tmp_path)  # slot 0: takes slot 1's settle over
    try:
        assert taker.path.name == "budget-outbox.0"
        assert [op for _, op in taker.due()] == [_op(7)]
        assert (tmp_path / "budget-outbox.1").stat().st_size == 0
    finally:
        taker.close()
    again = Outbox(tmp_path)  # the copy in slot 0 is still unacknowledged: once, not twice
    try:
        assert [op for _, op in again.due()] == [_op(7)]
    finally:
        again.close()


def test_a_full_outbox_keeps_only_the_unacknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path, size=4096)
    try:
        assert box.add(_op(0))
        for n in range(1, 2000):  # far more than 4 KB of frames
            box.ack([box.add(_op(n))])
        assert box.unacked() == 1
        ids = [box.add(_op(n)) for n in range(100)]  # more than fits unacknowledged
        kept = [i for i in ids if i]
        assert ids[0] and len(kept) < 100 and box.skipped == 100 - len(kept)
        box.ack(kept[: len(kept) // 2])  # not yet half of the outbox: still refused
        assert box.add(_op(100)) == 0
        box.ack(kept[len(kept) // 2 : -1])  # now it is: kept again
        assert box.add(_op(101))
    finally:
        box.close()
    again = Outbox(tmp_path, size=4096)
    try:
        last = ids.index(kept[-1])  # the one settle of the 100 still unacknowledged
        assert [op for _, op in again.due()] == [_op(0), _op(last), _op(101)]
    finally:
        again.close()


def test_orphans_too_many_for_one_outbox_are_all_taken_over(tmp_path: Path) -> None:
    boxes = [Outbox(tmp_path, size=4096) for _ in range(3)]
    ops = [b'["s","r%d","1","",["team:a"],"%s",1,1]' % (n, b"x" * 40) for n in range(60)]
    for n, op in enumerate(ops):  # 20 of about 100 bytes each: each outbox half full
        assert boxes[n % 3].add(op)
    for box in boxes:
        box.close()
    taker = Outbox(tmp_path, size=4096)  # 6 KB to take over: it grows
    try:
        assert sorted(op for _, op in taker.due()) == sorted(ops)
    finally:
        taker.close()


def test_lease_charges_a_killed_replica_had_not_sent_are_sent_by_the_next(
    url: str, tmp_path: Path
) -> None:
    redis.Redis.from_url(url).flushall()
    _killed(
        f"""
        import asyncio, sys
        from pathlib import Path
        from veil_budget.redis_store import RedisStore
        from veil_budget.store import Counter, Usage

        usage = Usage("alpha", "k1", "", "gpt-4o", prompt_tokens=10, completion_tokens=5)
        counters = [Counter("{TEAM}", 10**12)]

        async def main():
            store = RedisStore(sys.argv[1], lease_calls=64, outbox_dir=Path(sys.argv[2]))
            await store.reserve("first", {CALL}, counters, [], 30)
            await store.settle("first", {CALL}, ["{TEAM}"], None, usage)
            while not any(store.leases.held().values()):
                await asyncio.sleep(0.005)
            await store.drain()
            for n in range(20):  # from the lease: no round trip, charges wait 10 ms
                await store.reserve(f"c{{n}}", {CALL}, counters, [], 30)
                await store.settle(f"c{{n}}", {CALL}, ["{TEAM}"], None, usage)
            assert store.leases.served == 20 and store.outbox.unacked() == 20
            {KILL}  # before the charges' 10 ms are up

        asyncio.run(main())
        """,
        url,
        str(tmp_path),
    )

    async def main() -> None:
        plain = RedisStore(url)
        try:
            assert (await plain.spent([TEAM]))[TEAM][0] == CALL  # the first call only
            store = RedisStore(url, outbox_dir=tmp_path)
            try:
                for _ in range(200):
                    if store.outbox is not None and store.outbox.unacked() == 0:
                        break
                    await asyncio.sleep(0.01)
                assert (await store.spent([TEAM]))[TEAM][0] == 21 * CALL
                (row,) = await store.report()
                assert (row.calls, row.cost, row.prompt_tokens) == (21, 21 * CALL, 210)
            finally:
                await store.close()
            again = RedisStore(url, outbox_dir=tmp_path)  # nothing is sent twice
            await again.close()
            assert (await plain.spent([TEAM]))[TEAM][0] == 21 * CALL
        finally:
            await plain.close()

    run(main())


@pytest.mark.parametrize("lease_calls", [0, 8], ids=["settles", "lease-charges"])
def test_settles_that_redis_refused_are_sent_again_once_it_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lease_calls: int
) -> None:
    monkeypatch.setattr(redis_store, "RESEND_S", 0.05)
    counters = [Counter(TEAM, 10**12)]
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)

        async def main() -> None:
            store = RedisStore(server.url, lease_calls=lease_calls, outbox_dir=tmp_path)
            try:
                await store.reserve("first", CALL, counters, [], 30)
                await store.settle("first", CALL, [TEAM], None, USAGE)
                if lease_calls:
                    assert store.leases is not None
                    while not any(store.leases.held().values()):
                        await asyncio.sleep(0.005)
                await store.drain()
                for n in range(5):
                    await store.reserve(f"c{n}", CALL, counters, [], 30)
                # from now on Redis refuses this replica (it has no password)
                admin.config_set("requirepass", "pw")
                admin.client_kill_filter(_type="normal", skipme=True)
                for n in range(5):
                    await store.settle(f"c{n}", CALL, [TEAM], None, USAGE)
                assert store.outbox is not None
                deadline = time.monotonic() + 5
                while store.outbox.unacked() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert store.outbox.unacked() == 5  # refused, kept
                assert int(admin.hget(f"{store.base}c:{TEAM}", "spent") or 0) == CALL
                admin.config_set("requirepass", "")
                deadline = time.monotonic() + 5
                while store.outbox.unacked() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert store.outbox.unacked() == 0
                assert int(admin.hget(f"{store.base}c:{TEAM}", "spent") or 0) == 6 * CALL
            finally:
                await store.close()

        run(main())


def _row(team: str) -> str:
    return f'["{team}","k1","","gpt-4o"]\x1f'


def test_the_report_shows_what_outboxes_hold_beside_redis_s_totals(
    tmp_path: Path,
    redis_server: RedisServer,
    budget_policy: Any,
) -> None:
    import json

    from veil_budget.redis_outbox import Waiting, waiting

    redis_server.command("FLUSHALL")
    box = Outbox(tmp_path)  # a process that died with three settles unsent, one sent
    settled = [
        box.add(orjson.dumps(["s", "r1", "2000000", "", [TEAM], _row("alpha"), 10, 5])),
        box.add(orjson.dumps(["s", "r2", "3000000", "", [TEAM], _row("alpha"), 10, 5])),
        box.add(orjson.dumps(["c", "lease:x:1", "4000000", "0", [], _row("beta"), 30, 15, 3])),
    ]
    box.ack(settled[:1])
    box.close()
    assert waiting(tmp_path) == Waiting(files=1, calls=4, cost=7_000_000)
    assert waiting(tmp_path, "alpha") == Waiting(files=1, calls=1, cost=3_000_000)
    assert waiting(tmp_path / "nothing-here") == Waiting(0, 0, 0)

    policy = budget_policy(store="redis")

    def veil(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "veil", "budget", "report", *args, "--policy", str(policy),
             "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "VEIL_BUDGET_REDIS_URL": redis_server.url},
        )  # fmt: skip

    out = veil("--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["calls"] == 0  # Redis has none of them: beside the totals, not in them
    assert doc["outbox"] == {"calls": 4, "usd": 0.007, "files": 1}
    text = veil("--team", "beta").stdout
    assert "not yet in Redis: $0.004000 of 3 calls in 1 outbox file(s)" in text
    assert "not yet in Redis" not in veil("--since", "2999-01-01").stdout


def test_an_outbox_frame_this_store_does_not_write_is_left_out_of_the_report(
    tmp_path: Path,
) -> None:
    from veil_budget.redis_outbox import Waiting, waiting

    box = Outbox(tmp_path)
    box.add(orjson.dumps(["s", "r1", "not-nanos", "", [TEAM], _row("alpha"), 1, 1]))
    box.add(orjson.dumps(["c", "lease:x:1", "5", "0", [], _row("alpha"), 1, 1, None]))
    box.add(orjson.dumps(["s", "r2", "2000000", "", [TEAM], _row("alpha"), 10, 5]))
    box.close()
    assert waiting(tmp_path) == Waiting(files=1, calls=1, cost=2_000_000)
