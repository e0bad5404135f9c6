"""The SQLite store: budgets of one gateway process, durable across crashes.

What is durable and what is not:

- a settle appends its cost to the store's journal (``<file>.journal``,
  see :mod:`veil_budget.journal`) before it returns: once the call's answer
  leaves, its cost survives the process being killed. Every second (and at
  shutdown) the journal is folded into the SQLite file (WAL mode,
  ``synchronous=NORMAL``) in one transaction: the counters of committed
  spend (``counters``) and the spend report (``spend_daily``); a restart
  folds whatever the last run left in the journal;
- reservations in flight and rate-limit buckets live in memory: a crash
  drops them, which releases the reservations (their calls' upstream
  answers were never settled: at most those calls' cost goes unrecorded)
  and refills the buckets.

One gateway process owns a store file at a time (an exclusive lock on
``<file>.lock``; a second process is refused with a message pointing at
``store = "redis"``). Inside the process, policy reloads share the open
store, so reservations carry over. Other processes may read the file (``veil
budget report`` reads the SQLite file and the journal) and reset counters
(``veil budget reset``, recorded with its time in ``resets``): the store
notices their commits through ``PRAGMA data_version`` (checked at most
every 0.25 s), rereads the counters it caches, and leaves out of them the
journal's costs settled before a reset of their counter.

Every method runs on the event loop without awaiting: a reservation is
checked and taken, and a settle is journaled and applied, in one
uninterrupted step, so concurrent calls of the process cannot interleave.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
import time
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import structlog

from .journal import Journal, JournalFull, read_frames
from .store import Bucket, BucketState, Counter, Denied, Granted, SpendRow, Usage

__all__ = ["FOLD_INTERVAL_S", "SqliteStore", "StoreBusy", "journal_path", "open_sqlite"]

log = structlog.get_logger("veil.budget")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    spent INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS resets (
    id INTEGER PRIMARY KEY,
    pattern TEXT NOT NULL,
    at REAL NOT NULL
);
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
    "INSERT INTO spend_daily VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (day, team, key_id, user, model) DO UPDATE SET "
    "cost = cost + excluded.cost, calls = calls + excluded.calls, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens"
)


_RECHECK_S = 0.25
"""How often a reserve looks for other processes' commits (``veil budget reset``)."""
FOLD_INTERVAL_S = 1.0
"""How often the journal is folded into the SQLite file."""
_FOLD_RECORDS = 20_000
"""Fold at once when this many settles are waiting."""


def _day_of(minute: int) -> str:
    """The UTC day, ``YYYY-MM-DD``, of ``minute`` (minutes since the epoch;
    worked out once a minute)."""
    if _DAY[0] != minute:
        _DAY[0], _DAY[1] = minute, time.strftime("%Y-%m-%d", time.gmtime(minute * 60))
    return str(_DAY[1])


_DAY: list[Any] = [-1, ""]


class StoreBusy(RuntimeError):
    """Another gateway process owns this SQLite store."""


_Reservation = tuple[int, dict[str, int], dict[str, int] | None, float]
"""A reservation in memory: its amount, its counters (keys; the values are
the totals it was granted at), what it took from each token bucket (``None``:
none), and its deadline (``time.monotonic``)."""

_new = tuple.__new__  # a NamedTuple without its Python-level __new__ (see stage.py)


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
        self._spent: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._pending: dict[str, _Reservation] = {}
        self._buckets: dict[str, list[float]] = {}
        self._users = 0
        self._checked = 0.0
        self._unfolded: list[list[Any]] = []
        self._unfolded_spent: dict[str, int] = {}
        self._fold_timer: asyncio.TimerHandle | None = None
        self.journal = Journal(journal_path(path))
        generation, frames = read_frames(self.journal.path)
        folded = _folded_generation(self.db)
        if generation is not None and generation > folded and frames:
            _fold_into(self.db, frames, generation)  # what the last run left
        self.journal.restart(max(generation or 0, folded) + 1)
        self._version = self._data_version()

    # -- internals --------------------------------------------------------------

    def _data_version(self) -> int:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def _fresh(self, now: float) -> None:
        """Forget cached spend when another connection committed (a reset),
        and leave the journal's costs that a reset came after out of the
        counters; checked at most every ``_RECHECK_S``."""
        if now - self._checked < _RECHECK_S:
            return
        self._checked = now
        version = self._data_version()
        if version != self._version:
            self._version = version
            self._spent.clear()
            if self._unfolded:
                resets = _resets_since(self.db, self._unfolded[0][0])
                self._unfolded_spent = _counter_deltas(self._unfolded, resets)

    def _spent_of(self, key: str) -> int:
        """Committed spend of ``key``: the SQLite file's plus the journal's."""
        spent = self._spent.get(key)
        if spent is None:
            row = self.db.execute("SELECT spent FROM counters WHERE key = ?", (key,)).fetchone()
            spent = int(row[0]) if row else 0
            spent = self._spent[key] = spent + self._unfolded_spent.get(key, 0)
        return spent

    def _expire(self, now: float) -> None:
        for rid in [r for r, res in self._pending.items() if res[3] <= now]:
            self._drop(rid, used=0)

    def _drop(self, rid: str, used: int | None) -> _Reservation | None:
        """Forget a reservation; its token buckets get back what it took
        minus ``used`` (``None``: nothing comes back)."""
        res = self._pending.pop(rid, None)
        if res is None:
            return None
        amount, counters, tokens, _ = res
        reserved = self._reserved
        for key in counters:
            left = reserved[key] - amount
            if left:
                reserved[key] = left
            else:
                del reserved[key]
        if tokens and used is not None:
            for key, took in tokens.items():
                bucket = self._buckets.get(key)
                if bucket is not None:
                    back = took - used
                    bucket[0] = min(bucket[2], bucket[0] + back)
        return res

    # -- the Store protocol -------------------------------------------------------

    async def reserve(
        self,
        rid: str,
        amount: int,
        counters: list[Counter],
        buckets: list[Bucket],
        ttl_s: float,
    ) -> Granted | Denied:
        """See :meth:`veil_budget.store.Store.reserve` (runs :meth:`reserve_now`)."""
        return self.reserve_now(rid, amount, counters, buckets, ttl_s)

    def reserve_now(
        self,
        rid: str,
        amount: int,
        counters: list[Counter],
        buckets: list[Bucket],
        ttl_s: float,
    ) -> Granted | Denied:
        """:meth:`reserve` without a coroutine (it never waits). A bucket
        listed twice is taken from twice: the second check sees what the
        first took."""
        now = time.monotonic()
        pending = self._pending
        if pending and len(pending) % 64 == 0:
            self._expire(now)
        if now - self._checked >= _RECHECK_S:
            self._fresh(now)
        spent, reserved = self._spent, self._reserved
        committed: dict[str, int] = {}
        for key, limit in counters:
            total = spent[key] if key in spent else self._spent_of(key)
            total += reserved.get(key, 0) + amount
            if total > limit:
                self._expire(now)  # what expired may make room
                total = self._spent_of(key) + reserved.get(key, 0) + amount
                if total > limit:
                    return Denied("budget", key, None, total - amount)
            committed[key] = total  # a key listed twice: checked against each limit
        out: dict[str, BucketState] = {}
        tokens: dict[str, int] | None = None
        levels = self._buckets
        for i, b in enumerate(buckets):
            key, capacity, take, window_s = b
            state = levels.get(key)
            if state is None:
                state = levels[key] = [float(capacity), now, capacity]
            else:
                state[2] = capacity  # a reloaded policy may change the limit
                level = state[0] + (now - state[1]) * capacity / window_s
                state[0] = level if level < capacity else float(capacity)
                state[1] = now
            if state[0] < take:
                self._give_back(buckets[:i])  # nothing is taken
                return Denied("rate", key, (take - state[0]) * window_s / capacity)
            left = state[0] = state[0] - take
            if take > 1:
                if tokens is None:
                    tokens = {key: take}
                else:
                    tokens[key] = tokens.get(key, 0) + take
            out[key] = _new(BucketState, (int(left), (capacity - left) * window_s / capacity))
        for key in committed:
            reserved[key] = reserved.get(key, 0) + amount
        pending[rid] = (amount, committed, tokens, now + ttl_s)
        return _new(Granted, (committed, out))

    def _give_back(self, taken: list[Bucket]) -> None:
        """Return to each bucket of ``taken`` what this reservation took from it."""
        levels = self._buckets
        for key, _, take, _ in taken:
            levels[key][0] += take

    async def settle(
        self, rid: str, cost: int, counters: list[str], tokens: int | None, usage: Usage
    ) -> None:
        """See :meth:`veil_budget.store.Store.settle` (runs :meth:`settle_now`)."""
        self.settle_now(rid, cost, counters, tokens, usage)

    def settle_now(
        self, rid: str, cost: int, counters: list[str], tokens: int | None, usage: Usage
    ) -> None:
        """:meth:`settle` without a coroutine (it never waits). The cost is
        in the journal when this returns (see the module doc).

        :raises sqlite3.Error: the journal was full and could not be folded;
            nothing changed (the reservation stays until it expires, so the
            budget still counts it).
        """
        keys = list(dict.fromkeys(counters))
        now = time.time()
        record = [now, keys, cost, _day_of(int(now // 60)), *usage]
        try:
            self.journal.append(record)
        except JournalFull:
            self.fold()
            self.journal.append(record)
        unfolded = self._unfolded
        unfolded.append(record)
        if cost:
            deltas, spent = self._unfolded_spent, self._spent
            for key in keys:
                deltas[key] = deltas.get(key, 0) + cost
                if key in spent:
                    spent[key] += cost
        self._drop(rid, used=tokens)
        if len(unfolded) >= _FOLD_RECORDS:
            self.fold()
        elif self._fold_timer is None:
            loop = asyncio.get_running_loop()
            self._fold_timer = loop.call_later(FOLD_INTERVAL_S, self._fold_later)

    def _fold_later(self) -> None:
        self._fold_timer = None
        try:
            self.fold()
        except Exception as e:  # noqa: BLE001 - the journal keeps the costs; try again
            log.error("budget_fold_failed", error=type(e).__name__, waiting=len(self._unfolded))
            if self._unfolded:
                loop = asyncio.get_running_loop()
                self._fold_timer = loop.call_later(FOLD_INTERVAL_S, self._fold_later)

    def fold(self) -> None:
        """Commit the journal's settles to the SQLite file and start a new
        journal generation.

        :raises sqlite3.Error: the commit failed; the journal and the
            in-memory totals stay as they were.
        """
        if not self._unfolded:
            return
        _fold_into(self.db, self._unfolded, self.journal.generation)
        self._unfolded = []
        self._unfolded_spent = {}
        self.journal.restart(self.journal.generation + 1)

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
        self.fold()
        return read_report(self.db, since)

    async def reset(self, pattern: str) -> int:
        """See :meth:`veil_budget.store.Store.reset`."""
        self.fold()
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
        if self._fold_timer is not None:
            self._fold_timer.cancel()
            self._fold_timer = None
        try:
            self.fold()
        finally:
            self.journal.close()
            self.db.close()
            self._lock_file.close()


def journal_path(path: Path) -> Path:
    """The journal of the store file ``path``."""
    return path.with_name(path.name + ".journal")


def _folded_generation(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE name = 'folded_generation'").fetchone()
    return int(row[0]) if row else 0


def _resets_since(db: sqlite3.Connection, since: float) -> list[tuple[str, float]]:
    rows = db.execute("SELECT pattern, at FROM resets WHERE at > ?", (since,)).fetchall()
    return [(str(pattern), float(at)) for pattern, at in rows]


def _counter_deltas(records: list[Any], resets: list[tuple[str, float]]) -> dict[str, int]:
    """Each counter's cost in the journal ``records``, leaving out a record's
    cost on a counter that a later reset matched."""
    deltas: dict[str, int] = {}
    for at, keys, cost, *_ in records:
        if not cost:
            continue
        for key in keys:
            if resets and any(t > at and fnmatchcase(key, p) for p, t in resets):
                continue
            deltas[key] = deltas.get(key, 0) + cost
    return deltas


def _day_rows(records: list[Any]) -> dict[tuple[str, ...], list[int]]:
    """The journal ``records`` summed per (day, team, key, user, model):
    cost, calls, prompt and completion tokens."""
    days: dict[tuple[str, ...], list[int]] = {}
    for _, _, cost, day, team, key_id, user, model, prompt, completion in records:
        ident = (day, team, key_id, user, model)
        row = days.get(ident)
        if row is None:
            days[ident] = [cost, 1, prompt, completion]
        else:
            row[0] += cost
            row[1] += 1
            row[2] += prompt
            row[3] += completion
    return days


def _fold_into(db: sqlite3.Connection, records: list[Any], generation: int) -> None:
    """Add the journal ``records`` of ``generation`` to the counters and the
    report, and mark the generation folded, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        resets = _resets_since(db, min(r[0] for r in records))
        deltas = _counter_deltas(records, resets)
        if deltas:
            db.executemany(_ADD_SPENT, deltas.items())
        db.executemany(_ADD_DAY, [(*k, *v) for k, v in _day_rows(records).items()])
        db.execute(
            "INSERT INTO meta VALUES ('folded_generation', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (generation,),
        )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def read_report(
    db: sqlite3.Connection, since: str | None, journal: Path | None = None
) -> list[SpendRow]:
    """The spend rows of days ``>= since``: the SQLite file's and, with
    ``journal``, the settles in it not folded yet (a report from another
    process while a gateway serves; a fold running meanwhile may leave out
    the last second's settles)."""
    db.execute("BEGIN")
    try:
        rows = db.execute(
            "SELECT day, team, key_id, user, model, cost, calls, prompt_tokens, "
            "completion_tokens FROM spend_daily WHERE day >= ?",
            (since or "",),
        ).fetchall()
        folded = _folded_generation(db) if journal is not None else 0
    finally:
        db.execute("COMMIT")
    sums = {tuple(row[:5]): list(row[5:]) for row in rows}
    if journal is not None:
        generation, frames = read_frames(journal)
        if generation is not None and generation > folded:
            for ident, extra in _day_rows(frames).items():
                if ident[0] < (since or ""):
                    continue
                row = sums.setdefault(ident, [0, 0, 0, 0])
                for i, value in enumerate(extra):
                    row[i] += value
    return [SpendRow(*ident, *values) for ident, values in sorted(sums.items())]


def reset_counters(db: sqlite3.Connection, pattern: str) -> int:
    """Set the spent total of the counters matching the glob ``pattern`` to
    0, and record the reset (a serving gateway leaves the costs it settled
    before it out of those counters)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        cur = db.execute(
            "UPDATE counters SET spent = 0 WHERE key GLOB ? AND spent != 0", (pattern,)
        )
        db.execute("INSERT INTO resets (pattern, at) VALUES (?, ?)", (pattern, time.time()))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
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
