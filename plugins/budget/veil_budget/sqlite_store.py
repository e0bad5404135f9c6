"""The SQLite store: budgets of one gateway process, durable across crashes.

What is durable and what is not:

- committed spend (``counters``) and the spend report (``spend_daily``) are
  written in one transaction when a call settles, in WAL mode with
  ``synchronous=NORMAL``: a committed transaction survives the process being
  killed (it is in the WAL file), so a restart finds every settled cost;
- reservations in flight and rate-limit buckets live in memory: a crash
  drops them, which releases the reservations (their calls' upstream
  answers were never settled: at most those calls' cost goes unrecorded)
  and refills the buckets.

One gateway process owns a store file at a time (an exclusive lock on
``<file>.lock``; a second process is refused with a message pointing at
``store = "redis"``). Inside the process, policy reloads share the open
store, so reservations carry over. Other processes may read the file (``veil
budget report``) and reset counters (``veil budget reset``): the store
notices their commits through ``PRAGMA data_version`` (checked at most
every 0.25 s) and rereads the counters it caches.

Every method runs on the event loop without awaiting: a reservation is
checked and taken in one uninterrupted step, so concurrent calls of the
process cannot interleave. Settles are committed in small transactions (tens
of microseconds: no ``fsync``, the WAL is written to the OS), the settles of
one turn of the event loop together, before any of them returns.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import Bucket, BucketState, Counter, Denied, Granted, SpendRow, Usage

__all__ = ["SqliteStore", "StoreBusy", "open_sqlite"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    spent INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spend_daily (
    day TEXT NOT NULL,
    team TEXT NOT NULL,
    key_id TEXT NOT NULL,
    user TEXT NOT NULL,
    model TEXT NOT NULL,
    cost INTEGER NOT NULL DEFAULT 0,
    calls INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, team, key_id, user, model)
) WITHOUT ROWID;
"""

_ADD_SPENT = (
    "INSERT INTO counters (key, spent) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET spent = spent + excluded.spent"
)
_ADD_DAY = (
    "INSERT INTO spend_daily VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?) "
    "ON CONFLICT (day, team, key_id, user, model) DO UPDATE SET "
    "cost = cost + excluded.cost, calls = calls + 1, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens"
)


_RECHECK_S = 0.25
"""How often a reserve looks for other processes' commits (``veil budget reset``)."""


def _today() -> str:
    """The UTC day, ``YYYY-MM-DD`` (recomputed once a minute)."""
    minute = int(time.time() // 60)
    if _DAY[0] != minute:
        _DAY[0], _DAY[1] = minute, time.strftime("%Y-%m-%d", time.gmtime(minute * 60))
    return str(_DAY[1])


_DAY: list[Any] = [-1, ""]


class StoreBusy(RuntimeError):
    """Another gateway process owns this SQLite store."""


@dataclass(slots=True)
class _Reservation:
    amount: int
    counters: tuple[str, ...]
    tokens: dict[str, int]
    deadline: float


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection to the store file with the schema in place (``readonly``:
    an existing file only, for reports)."""
    if readonly:
        if not path.is_file():
            raise FileNotFoundError(f"no budget store at {path}")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA page_size=1024")  # new files: a settle writes 1 KB pages, not 4 KB
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    conn.execute("PRAGMA busy_timeout=2000")
    return conn


class SqliteStore:
    """See the module doc. Build with :func:`open_sqlite` (one per file and
    process); ``close()`` when done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(f"{path}.lock", "a+b")  # noqa: SIM115 - held while open
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreBusy(
                f"another gateway process uses the budget store {path}; a SQLite store "
                'serves one process: set [budget] store = "redis" for several replicas'
            ) from None
        self.db = connect(path)
        self._version = self._data_version()
        self._spent: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._pending: dict[str, _Reservation] = {}
        self._buckets: dict[str, list[float]] = {}
        self._users = 0
        self._checked = 0.0
        self._queue: list[tuple[str, int | None, tuple[str, ...], int, tuple[Any, ...]]] = []
        self._flushing: asyncio.Future[None] | None = None

    # -- internals --------------------------------------------------------------

    def _data_version(self) -> int:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def _fresh(self, now: float) -> None:
        """Forget cached spend when another connection committed (a reset);
        checked at most every ``_RECHECK_S``."""
        if now - self._checked < _RECHECK_S:
            return
        self._checked = now
        version = self._data_version()
        if version != self._version:
            self._version = version
            self._spent.clear()

    def _spent_of(self, key: str) -> int:
        spent = self._spent.get(key)
        if spent is None:
            row = self.db.execute("SELECT spent FROM counters WHERE key = ?", (key,)).fetchone()
            spent = self._spent[key] = int(row[0]) if row else 0
        return spent

    def _expire(self, now: float) -> None:
        for rid in [r for r, res in self._pending.items() if res.deadline <= now]:
            self._drop(rid, used=0)

    def _drop(self, rid: str, used: int | None) -> _Reservation | None:
        """Forget a reservation; its token buckets get back what it took
        minus ``used`` (``None``: nothing comes back)."""
        res = self._pending.pop(rid, None)
        if res is None:
            return None
        for key in res.counters:
            self._reserved[key] -= res.amount
            if not self._reserved[key]:
                del self._reserved[key]
        for key, took in res.tokens.items():
            bucket = self._buckets.get(key)
            if bucket is not None and used is not None:
                back = took - used
                bucket[0] = min(bucket[2], bucket[0] + back)
        return res

    def _refill(self, bucket: Bucket, now: float) -> list[float]:
        state = self._buckets.get(bucket.key)
        rate = bucket.capacity / bucket.window_s
        if state is None:
            state = self._buckets[bucket.key] = [float(bucket.capacity), now, bucket.capacity]
        else:
            state[2] = bucket.capacity  # a reloaded policy may change the limit
            state[0] = min(float(bucket.capacity), state[0] + (now - state[1]) * rate)
            state[1] = now
        return state

    # -- the Store protocol -------------------------------------------------------

    async def reserve(
        self,
        rid: str,
        amount: int,
        counters: list[Counter],
        buckets: list[Bucket],
        ttl_s: float,
    ) -> Granted | Denied:
        """See :meth:`veil_budget.store.Store.reserve`."""
        now = time.monotonic()
        if self._pending and len(self._pending) % 64 == 0:
            self._expire(now)
        self._fresh(now)
        limits: dict[str, int] = {}
        for c in counters:
            limits[c.key] = min(c.limit, limits.get(c.key, c.limit))
        committed = {}
        for key, limit in limits.items():
            total = self._spent_of(key) + self._reserved.get(key, 0)
            if total + amount > limit:
                self._expire(now)  # what expired may make room
                total = self._spent_of(key) + self._reserved.get(key, 0)
                if total + amount > limit:
                    return Denied("budget", key, None, total)
            committed[key] = total + amount
        states = []
        for b in buckets:
            state = self._refill(b, now)
            if state[0] < b.take:
                rate = b.capacity / b.window_s
                return Denied("rate", b.key, (b.take - state[0]) / rate)
            states.append((b, state))
        out = {}
        tokens = {}
        for b, state in states:
            state[0] -= b.take
            if b.take > 1:
                tokens[b.key] = tokens.get(b.key, 0) + b.take
            rate = b.capacity / b.window_s
            out[b.key] = BucketState(int(state[0]), (b.capacity - state[0]) / rate)
        for key in limits:
            self._reserved[key] = self._reserved.get(key, 0) + amount
        self._pending[rid] = _Reservation(amount, tuple(limits), tokens, now + ttl_s)
        return Granted(committed, out)

    async def settle(
        self, rid: str, cost: int, counters: list[str], tokens: int | None, usage: Usage
    ) -> None:
        """See :meth:`veil_budget.store.Store.settle`.

        Settles that arrive in the same turn of the event loop are committed
        together, in one transaction (group commit); each returns once its
        transaction is committed."""
        day = _today()
        row = (
            day,
            usage.team,
            usage.key_id,
            usage.user,
            usage.model,
            cost,
            usage.prompt_tokens,
            usage.completion_tokens,
        )
        self._queue.append((rid, tokens, tuple(dict.fromkeys(counters)), cost, row))
        flushing = self._flushing
        if flushing is None:
            loop = asyncio.get_running_loop()
            flushing = self._flushing = loop.create_future()
            loop.call_soon(self._flush)
        await flushing

    def _flush(self) -> None:
        """Commit the queued settles in one transaction; then, in the same
        step, their reservations leave the reserved totals and their costs
        join the cached spent totals (until then, a concurrent reserve
        counts each settling call at its reserved amount: never less)."""
        queue, self._queue = self._queue, []
        done, self._flushing = self._flushing, None
        assert done is not None
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                spent = [(key, cost) for _, _, keys, cost, _ in queue if cost for key in keys]
                if spent:
                    db.executemany(_ADD_SPENT, spent)
                db.executemany(_ADD_DAY, [row for *_, row in queue])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except Exception as e:  # noqa: BLE001 - handed to every waiting settle
            # Not recorded (the callers log each lost cost). The reservations
            # stay until they expire, so the budget still counts them.
            if not done.done():
                done.set_exception(e)
            return
        for rid, tokens, keys, cost, _ in queue:
            self._drop(rid, used=tokens)
            if cost:
                for key in keys:
                    if key in self._spent:
                        self._spent[key] += cost
        if not done.done():
            done.set_result(None)

    async def release(self, rid: str) -> None:
        """See :meth:`veil_budget.store.Store.release`."""
        self._drop(rid, used=0)

    async def spent(self, keys: list[str]) -> dict[str, tuple[int, int]]:
        """See :meth:`veil_budget.store.Store.spent`."""
        self._checked = 0.0
        self._fresh(time.monotonic())
        return {key: (self._spent_of(key), self._reserved.get(key, 0)) for key in keys}

    async def report(self, since: str | None = None) -> list[SpendRow]:
        """See :meth:`veil_budget.store.Store.report`."""
        return read_report(self.db, since)

    async def reset(self, pattern: str) -> int:
        """See :meth:`veil_budget.store.Store.reset`."""
        count = reset_counters(self.db, pattern)
        self._spent.clear()
        return count

    async def close(self) -> None:
        """Drop one user of the store; the last one closes the file."""
        with _OPEN_LOCK:
            self._users -= 1
            if self._users > 0:
                return
            _OPEN.pop(self.path, None)
        self.db.close()
        self._lock_file.close()


def read_report(db: sqlite3.Connection, since: str | None) -> list[SpendRow]:
    """The ``spend_daily`` rows of days ``>= since``."""
    rows = db.execute(
        "SELECT day, team, key_id, user, model, cost, calls, prompt_tokens, completion_tokens "
        "FROM spend_daily WHERE day >= ? ORDER BY day, team, key_id, user, model",
        (since or "",),
    ).fetchall()
    return [SpendRow(*row) for row in rows]


def reset_counters(db: sqlite3.Connection, pattern: str) -> int:
    """Set the spent total of the counters matching the glob ``pattern`` to 0."""
    cur = db.execute("UPDATE counters SET spent = 0 WHERE key GLOB ? AND spent != 0", (pattern,))
    return int(cur.rowcount)


_OPEN: dict[Path, SqliteStore] = {}
_OPEN_LOCK = threading.Lock()


def open_sqlite(path: str | Path) -> SqliteStore:
    """The process's store for ``path`` (opened on first use; each call
    must be matched by a ``close()``).

    :raises StoreBusy: another process owns the file.
    """
    resolved = Path(os.path.abspath(path))
    with _OPEN_LOCK:
        store = _OPEN.get(resolved)
        if store is None:
            store = _OPEN[resolved] = SqliteStore(resolved)
        store._users += 1
        return store
