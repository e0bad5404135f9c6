"""The SQLite store on its own: arithmetic, all-or-nothing refusals, the
settle window, resets from another process, one owner per file, and
durability: across a reopen, and of the settle journal across a crash (a
torn last frame, a crash between a fold's commit and the journal's restart)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

from veil_budget.journal import Journal, read_frames
from veil_budget.sqlite_store import (
    SqliteStore,
    StoreBusy,
    _fold_into,
    connect,
    journal_path,
    open_sqlite,
    read_report,
    reset_counters,
)
from veil_budget.store import Bucket, Counter, Denied, Granted, Usage

USAGE = Usage("alpha", "k1", "ann", "gpt-4o", prompt_tokens=10, completion_tokens=5)
TEAM = "team:alpha:month:2026-11"


def test_reserve_settle_release_arithmetic(tmp_path: Path) -> None:
    async def go() -> None:
        store = open_sqlite(tmp_path / "b.sqlite3")
        try:
            granted = await store.reserve("a", 60, [Counter(TEAM, 100)], [], 60)
            assert isinstance(granted, Granted) and granted.committed == {TEAM: 60}
            denied = await store.reserve("b", 41, [Counter(TEAM, 100)], [], 60)
            assert isinstance(denied, Denied) and denied.kind == "budget" and denied.committed == 60
            await store.settle("a", 25, [TEAM], None, USAGE)
            assert await store.spent([TEAM]) == {TEAM: (25, 0)}
            assert isinstance(await store.reserve("c", 75, [Counter(TEAM, 100)], [], 60), Granted)
            await store.release("c")
            assert await store.spent([TEAM]) == {TEAM: (25, 0)}
            (row,) = await store.report()
            assert (row.team, row.cost, row.calls, row.prompt_tokens) == ("alpha", 25, 1, 10)
        finally:
            await store.close()

    asyncio.run(go())


def test_a_refusal_takes_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        store = open_sqlite(tmp_path / "b.sqlite3")
        try:
            bucket = Bucket("rpm:key:k1", 10, 1)
            denied = await store.reserve("a", 200, [Counter(TEAM, 100)], [bucket], 60)
            assert isinstance(denied, Denied)
            granted = await store.reserve("b", 100, [Counter(TEAM, 100)], [bucket], 60)
            assert isinstance(granted, Granted)
            assert granted.buckets["rpm:key:k1"].remaining == 9  # the refusal took no request
            tight = Bucket("tpm:key:k1", 50, 40)
            assert isinstance(await store.reserve("c", 0, [], [tight], 60), Granted)
            refused = await store.reserve("d", 0, [Counter(TEAM, 100)], [tight], 60)
            assert isinstance(refused, Denied) and refused.kind == "rate"
            assert refused.retry_after_s is not None and 0 < refused.retry_after_s <= 60
            # a later bucket refuses: what the earlier ones took goes back
            roomy = Bucket("rpm:key:k2", 10, 1)
            refused = await store.reserve("e", 0, [], [roomy, tight], 60)
            assert isinstance(refused, Denied) and refused.key == "tpm:key:k1"
            granted = await store.reserve("f", 0, [], [roomy], 60)
            assert isinstance(granted, Granted) and granted.buckets["rpm:key:k2"].remaining == 9
            # one bucket listed twice: the second take sees the first's, and both go back
            six = Bucket("tpm:key:k3", 10, 6)
            assert isinstance(await store.reserve("g", 0, [], [six, six], 60), Denied)
            granted = await store.reserve("h", 0, [], [six], 60)
            assert isinstance(granted, Granted) and granted.buckets["tpm:key:k3"].remaining == 4
        finally:
            await store.close()

    asyncio.run(go())


def test_a_settling_call_counts_until_its_cost_is_committed(tmp_path: Path) -> None:
    """A settle journals its cost and drops its reservation in one step: at
    no point does the call count for less than its cost."""

    async def go() -> None:
        store = open_sqlite(tmp_path / "b.sqlite3")
        try:
            assert isinstance(await store.reserve("a", 100, [Counter(TEAM, 100)], [], 60), Granted)
            settling = asyncio.ensure_future(store.settle("a", 100, [TEAM], None, USAGE))
            await asyncio.sleep(0) if not settling.done() else None
            assert isinstance(await store.reserve("b", 1, [Counter(TEAM, 100)], [], 60), Denied)
            await settling
            assert isinstance(await store.reserve("c", 1, [Counter(TEAM, 100)], [], 60), Denied)
            assert await store.spent([TEAM]) == {TEAM: (100, 0)}
        finally:
            await store.close()

    asyncio.run(go())


def test_expired_reservations_come_back(tmp_path: Path) -> None:
    async def go() -> None:
        store = open_sqlite(tmp_path / "b.sqlite3")
        try:
            granted = await store.reserve("a", 100, [Counter(TEAM, 100)], [], 0.05)
            assert isinstance(granted, Granted)
            await asyncio.sleep(0.1)
            assert isinstance(await store.reserve("b", 100, [Counter(TEAM, 100)], [], 60), Granted)
        finally:
            await store.close()

    asyncio.run(go())


def test_spend_survives_a_reopen_and_resets_from_elsewhere_are_seen(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"

    async def spend() -> None:
        store = open_sqlite(path)
        try:
            await store.reserve("a", 70, [Counter(TEAM, 100)], [], 60)
            await store.settle("a", 70, [TEAM], None, USAGE)
        finally:
            await store.close()

    async def after() -> None:
        store = open_sqlite(path)
        try:
            assert await store.spent([TEAM]) == {TEAM: (70, 0)}
            assert isinstance(await store.reserve("b", 31, [Counter(TEAM, 100)], [], 60), Denied)
            other = sqlite3.connect(path, isolation_level=None)  # `veil budget reset`
            assert reset_counters(other, "team:alpha:*") == 1
            other.close()
            await asyncio.sleep(0.3)
            assert isinstance(await store.reserve("c", 100, [Counter(TEAM, 100)], [], 60), Granted)
        finally:
            await store.close()

    asyncio.run(spend())
    asyncio.run(after())


def test_one_process_owns_a_store_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "b.sqlite3"
    store = open_sqlite(path)
    try:
        again = open_sqlite(path)
        assert again is store  # policy reloads in this process share it
        asyncio.run(again.close())  # one user left: still open and locked
        code = f"from veil_budget.sqlite_store import open_sqlite; open_sqlite({str(path)!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode != 0
        assert StoreBusy.__name__ in out.stderr and 'store = "redis"' in out.stderr
    finally:
        asyncio.run(store.close())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr  # closed: free for another process


def _crashed_copy(store: SqliteStore, into: Path) -> Path:
    """The files a process killed right now would leave (SQLite file, its
    WAL, the journal), copied to ``into``."""
    into.mkdir()
    for f in store.path.parent.iterdir():
        if f.name.startswith(store.path.name) and not f.name.endswith(".lock"):
            shutil.copy(f, into / f.name)
    return into / store.path.name


async def _spend(store: SqliteStore, n: int, cost: int = 10) -> None:
    for i in range(n):
        assert isinstance(
            await store.reserve(f"r{i}", cost, [Counter(TEAM, 10**9)], [], 60), Granted
        )
        await store.settle(f"r{i}", cost, [TEAM], None, USAGE)


def test_settles_are_journaled_and_survive_a_crash_before_the_fold(tmp_path: Path) -> None:
    async def go() -> tuple[Path, int]:
        store = open_sqlite(tmp_path / "live" / "b.sqlite3")
        try:
            await _spend(store, 5)
            generation, frames = read_frames(journal_path(store.path))
            assert len(frames) == 5 and generation == store.journal.generation
            # nothing folded yet: the SQLite file alone does not have them
            assert read_report(store.db, None) == []
            # another process's report adds the journal
            assert read_report(store.db, None, journal_path(store.path))[0].calls == 5
            return _crashed_copy(store, tmp_path / "crashed"), store.journal._pos
        finally:
            await store.close()

    crashed, end = asyncio.run(go())
    with (crashed.parent / "b.sqlite3.journal").open("r+b") as f:
        f.seek(end)
        f.write(b"\x40\x00\x00\x00\x12\x34\x56\x78torn")  # a frame the crash cut short

    async def after() -> None:
        store = open_sqlite(crashed)
        try:
            assert await store.spent([TEAM]) == {TEAM: (50, 0)}
            (row,) = await store.report()
            assert (row.calls, row.cost, row.prompt_tokens) == (5, 50, 50)
        finally:
            await store.close()

    asyncio.run(after())


def test_a_crashed_runs_frames_do_not_outlive_the_next_runs_restart(tmp_path: Path) -> None:
    """The next run folds the dead run's frames and restarts the journal; its
    own frames (as long as the old ones) must not leave the old ones readable
    behind them, or a second crash would count those twice."""

    async def crash_after(path: Path, into: Path, calls: int) -> Path:
        store = open_sqlite(path)
        try:
            await _spend(store, calls)
            return _crashed_copy(store, into)
        finally:
            store._unfolded = []  # the dead process folds nothing at close
            await store.close()

    first = asyncio.run(crash_after(tmp_path / "live" / "b.sqlite3", tmp_path / "one", 5))
    second = asyncio.run(crash_after(first, tmp_path / "two", 1))

    async def after() -> None:
        store = open_sqlite(second)
        try:
            assert await store.spent([TEAM]) == {TEAM: (60, 0)}
            (row,) = await store.report()
            assert row.calls == 6
        finally:
            await store.close()

    asyncio.run(after())


def test_a_crash_between_a_folds_commit_and_the_journal_restart_counts_once(
    tmp_path: Path,
) -> None:
    async def go() -> Path:
        store = open_sqlite(tmp_path / "live" / "b.sqlite3")
        try:
            await _spend(store, 3)
            # the fold's transaction commits, then the process dies
            _fold_into(store.db, store._unfolded, store.journal.generation)
            return _crashed_copy(store, tmp_path / "crashed")
        finally:
            store._unfolded = []  # what the dead process had folded
            await store.close()

    crashed = asyncio.run(go())

    async def after() -> None:
        store = open_sqlite(crashed)
        try:
            assert await store.spent([TEAM]) == {TEAM: (30, 0)}
            (row,) = await store.report()
            assert row.calls == 3
        finally:
            await store.close()

    asyncio.run(after())


def test_the_journal_is_folded_every_second_and_at_close(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"

    async def go() -> None:
        store = open_sqlite(path)
        try:
            await _spend(store, 2)
            first = store.journal.generation
            await asyncio.sleep(1.3)
            assert store.journal.generation == first + 1
            assert read_frames(journal_path(path))[1] == []
            assert read_report(store.db, None)[0].calls == 2
            await _spend(store, 1)
        finally:
            await store.close()
        db = connect(path)
        try:
            assert read_report(db, None)[0].calls == 3
        finally:
            db.close()

    asyncio.run(go())


def test_a_reset_from_elsewhere_leaves_out_the_journals_earlier_costs(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"

    async def go() -> None:
        store = open_sqlite(path)
        try:
            await _spend(store, 4, cost=20)  # 80, in the journal only
            other = sqlite3.connect(path, isolation_level=None)  # `veil budget reset`
            reset_counters(other, "team:alpha:*")
            other.close()
            await asyncio.sleep(0.3)
            granted = await store.reserve("x", 100, [Counter(TEAM, 100)], [], 60)
            assert isinstance(granted, Granted) and granted.committed == {TEAM: 100}
            await store.settle("x", 5, [TEAM], None, USAGE)
            store.fold()
            assert await store.spent([TEAM]) == {TEAM: (5, 0)}
            assert (await store.report())[0].calls == 5  # the report keeps history
        finally:
            await store.close()

    asyncio.run(go())


def test_a_full_journal_is_folded_and_the_settle_goes_on(tmp_path: Path) -> None:
    async def go() -> None:
        store = open_sqlite(tmp_path / "b.sqlite3")
        try:
            small = Journal(tmp_path / "small.journal", size=1024)
            small.restart(store.journal.generation)
            store.journal.close()
            store.journal = small
            await _spend(store, 20)  # about 130 bytes a frame: folds on the way
            assert store.journal.generation > 1
            assert await store.spent([TEAM]) == {TEAM: (200, 0)}
            assert (await store.report())[0].calls == 20
        finally:
            await store.close()

    asyncio.run(go())
