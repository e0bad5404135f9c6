"""The Redis store's outbox: a settle is on this machine before the call's
answer leaves, and stays there until Redis has run it.

Why: a replica sends its settles (and its leases' charges) to Redis in
batches, milliseconds apart, so one round trip carries many calls. Without
the outbox, a replica killed meanwhile loses what it was collecting: those
calls' spend is never recorded (their reservations expire and give the room
back). With it, a settle first becomes a frame in a memory-mapped file (a
:class:`veil_budget.journal.Journal`: a copy of a few hundred bytes, no
system call), which survives the process being killed like SQLite's WAL
would; an acknowledgement frame follows once Redis has run it. A process
that starts sends again what an earlier one left unacknowledged.

At least once: a batch that Redis ran but whose reply its process did not
live to see (or that timed out after running) is sent again, so its calls
count twice: spend is over-recorded by at most the batches in flight at a
crash, never lost. A settle sent again after its reservation expired is
recorded as plain spend (the reservation is gone), so if the room it held
went to other calls meanwhile, the total may pass the limit by it: a
gateway that restarts within the reservation's or lease's time to live
keeps the bound exact.

Files: ``budget-outbox.<n>`` in the gateway's state directory, one per live
process: a process holds an exclusive ``flock`` on its file for as long as
it runs. A file no live process holds is an orphan (its process died, or
stopped with Redis unreachable): the next process to start copies the
orphan's unacknowledged settles into its own outbox, then empties it.

Frames (JSON, see :mod:`veil_budget.journal`): ``[id, op]`` a settle, where
``op`` is the store's script operation as it is sent (``"s"`` or ``"c"``,
see :mod:`veil_budget.redis_store`); ``["a", id, ...]`` Redis ran those.
Ids are unique within one file. When the file is full, it is rewritten
with the unacknowledged settles only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from .journal import Journal, JournalFull, read_frames

__all__ = ["MAX_SLOTS", "Outbox", "Waiting", "unacknowledged", "waiting"]

log = structlog.get_logger("veil.budget")

MAX_SLOTS = 1024
"""Outbox files per state directory: at most this many processes at once."""
_PREFIX = "budget-outbox."


def _pending(frames: list[Any]) -> list[Any]:
    """The operations of ``frames`` (an outbox's, in order) with no
    acknowledgement, in the order they were added."""
    ops: dict[int, Any] = {}
    for frame in frames:
        if not isinstance(frame, list) or not frame:
            continue
        if frame[0] == "a":
            for i in frame[1:]:
                ops.pop(i, None)
        elif len(frame) == 2 and isinstance(frame[0], int):
            ops[frame[0]] = frame[1]
    return list(ops.values())


def unacknowledged(frames: list[Any]) -> list[bytes]:
    """:func:`_pending`, each operation encoded as it is sent."""
    return [orjson.dumps(op) for op in _pending(frames)]


@dataclass(frozen=True)
class Waiting:
    """Settles the outboxes of a state directory hold that Redis has not
    acknowledged (see :func:`waiting`)."""

    files: int
    """Outbox files holding any."""
    calls: int
    cost: int
    """Nano-dollars."""


def waiting(directory: Path, team: str | None = None) -> Waiting:
    """What the outboxes in ``directory`` hold unacknowledged (only ``team``'s
    calls, if given), read without taking them over: a live process's
    settles of the last few milliseconds, and everything a process that died
    left for the next one to send. Some of it Redis may have run already (a
    batch whose reply its process did not live to see), so it is reported
    beside the totals, never added to them.

    :raises OSError: a file cannot be read.
    """
    files = calls = cost = 0
    for path in sorted(directory.glob(_PREFIX + "*")):
        if not path.name[len(_PREFIX) :].isdigit():
            continue
        found = False
        for op in _pending(read_frames(path)[1]):
            # ["s", rid, cost, tokens, counters, field, ...] or ["c", lease, cost, back,
            # limits, field, prompt, completion, calls]: field is the report row's JSON + \x1f
            if not isinstance(op, list) or len(op) < 8 or op[0] not in ("s", "c"):
                continue
            if team is not None and _team_of(op[5]) != team:
                continue
            try:
                n, nanos = (int(op[8]) if op[0] == "c" and len(op) > 8 else 1), int(op[2])
            except (TypeError, ValueError):
                continue  # not an operation this store writes: nothing to count
            found = True
            calls += n
            cost += nanos
        files += found
    return Waiting(files, calls, cost)


def _team_of(field: Any) -> str | None:
    try:
        row = orjson.loads(str(field).rstrip("\x1f"))
    except orjson.JSONDecodeError:
        return None
    return row[0] if isinstance(row, list) and row else None


def _lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or ``None``
    when another live process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Outbox:
    """This process's outbox in ``directory`` (see the module doc).

    Opening it takes a free slot, and takes over every orphan: their
    unacknowledged settles (and this slot's own, left by a dead process)
    are copied into this outbox and wait in :meth:`due` to be sent again.

    :param size: the file's size in bytes (about 250 bytes per settle).
    :raises OSError: the directory or the file cannot be created, or every
        slot is held by a live process.
    """

    def __init__(self, directory: Path, *, size: int = 4 << 20) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        for n in range(MAX_SLOTS):
            path = directory / f"{_PREFIX}{n}"
            fd = _lock(path)
            if fd is not None:
                self._fd = fd
                break
        else:
            raise OSError(f"all {MAX_SLOTS} budget outbox slots in {directory} are in use")
        self.path = path
        orphans: list[tuple[Path, int]] = []
        try:
            left = unacknowledged(read_frames(path)[1])
            for other in sorted(directory.glob(_PREFIX + "*")):
                if other == path or not other.name[len(_PREFIX) :].isdigit():
                    continue
                fd = _lock(other)
                if fd is None:
                    continue  # a live process's
                orphans.append((other, fd))
                left += unacknowledged(read_frames(other)[1])
            # room for what it takes over (several full orphans), and as much again
            needed = sum(len(op) + 32 for op in left) * 2
            self.journal = Journal(path, max(size, needed))
        except BaseException:
            for _, fd in orphans:
                os.close(fd)
            self.close()
            raise
        self._next = 1
        self._unacked: dict[int, bytes] = {}
        self._full_at = 0
        self.skipped = 0
        """Settles not kept because the outbox was full."""
        for op in left:
            self._unacked[self._take_id()] = op
        self._rewrite()  # this process's copies first, then the orphans are emptied
        for other, fd in orphans:
            os.truncate(other, 0)
            os.close(fd)
        self._due: list[int] = list(self._unacked)
        if left:
            log.warning("budget_outbox_resend", settles=len(left), outbox=str(path))

    def _take_id(self) -> int:
        i = self._next
        self._next += 1
        return i

    def add(self, op: bytes) -> int:
        """Keep ``op`` (a settle's script operation) until :meth:`ack`; its id.

        0 when the outbox is full of settles Redis has not acknowledged
        (Redis unreachable for long): ``op`` is then not kept (sent all the
        same, but lost if the process dies before Redis runs it), until
        acknowledgements free half of the outbox. Logged when it fills and
        when it has room again, with how many settles went without it. 0
        too after :meth:`close`."""
        if self._fd is None or (self._full_at and len(self._unacked) > self._full_at // 2):
            self.skipped += 1
            return 0
        i = self._take_id()
        payload = b"[%d,%b]" % (i, op)
        try:
            self.journal.append_bytes(payload)
        except JournalFull:
            self._unacked[i] = op
            try:
                self._rewrite()  # without the settles acknowledged since the last one
            except JournalFull:
                del self._unacked[i]
                self._rewrite()
                self._full_at = len(self._unacked)
                self.skipped += 1
                log.error("budget_outbox_full", outbox=str(self.path), unacked=self._full_at)
                return 0
        else:
            self._unacked[i] = op
        if self._full_at:
            log.warning("budget_outbox_room_again", outbox=str(self.path), skipped=self.skipped)
            self._full_at = 0
        return i

    def ack(self, ids: Iterable[int]) -> None:
        """Redis ran the settles ``ids`` (0s are ignored; after :meth:`close`,
        nothing is written)."""
        done = [i for i in ids if self._unacked.pop(i, None) is not None]
        if not done or self._fd is None:
            return
        if not self._unacked and self.journal.used > self.journal.size // 2:
            self._rewrite()  # nothing to keep: start over while it is cheap
            return
        try:
            self.journal.append(["a", *done])
        except JournalFull:
            self._rewrite()

    def failed(self, ids: Iterable[int]) -> None:
        """Sending the settles ``ids`` failed: they are :meth:`due` again."""
        self._due.extend(i for i in ids if i in self._unacked)

    def due(self) -> list[tuple[int, bytes]]:
        """The settles to send (again): taken over at start, or whose
        sending failed; each is returned once per :meth:`failed`."""
        due, self._due = self._due, []
        return [(i, self._unacked[i]) for i in dict.fromkeys(due) if i in self._unacked]

    def unacked(self) -> int:
        """How many settles Redis has not acknowledged yet."""
        return len(self._unacked)

    def _rewrite(self) -> None:
        self.journal.rewrite([b"[%d,%b]" % (i, op) for i, op in self._unacked.items()])

    def close(self) -> None:
        """Close the file and give its slot up (what is unacknowledged stays
        in it for the next process)."""
        if getattr(self, "journal", None) is not None:
            with contextlib.suppress(BufferError, ValueError):
                self.journal.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
