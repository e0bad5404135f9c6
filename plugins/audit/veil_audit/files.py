"""The JSONL files of one audit directory: the active file, rotation, and
picking the chain up again after a restart or a crash.

Layout of a directory::

    audit.jsonl                                   the active file (appended to)
    audit-000000000000-20261128T101500Z.jsonl     rotated files: first seq, then
    audit-000000052113-20261129T101500Z.jsonl     the UTC time they were closed
    audit.lock                                    held (flock) by the writing process

Rotated names sort in chain order. Only one process writes a directory: a
second one is refused at start-up (:class:`DirectoryBusy`).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from .chain import GENESIS

__all__ = [
    "ACTIVE",
    "ActiveFile",
    "DirectoryBusy",
    "chain_files",
    "first_seq",
    "last_link",
    "read_records_bytes",
]

ACTIVE = "audit.jsonl"
_LOCK = "audit.lock"


class DirectoryBusy(RuntimeError):
    """Another process writes this audit directory."""


def chain_files(directory: Path) -> list[Path]:
    """The directory's audit files in chain order (rotated ones, then the active one)."""
    rotated = sorted(p for p in directory.glob("audit-*.jsonl") if p.is_file())
    active = directory / ACTIVE
    return rotated + ([active] if active.is_file() else [])


def _last_line(path: Path) -> tuple[bytes | None, bool]:
    """The last complete line of ``path`` (without newline), and whether the
    file ends with a partial line."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        if end == 0:
            return None, False
        f.seek(end - 1)
        partial = f.read(1) != b"\n"
        pos, tail = end, b""
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            lines = tail.split(b"\n")
            complete = lines[:-1]  # the piece after the last newline is partial or empty
            if len(complete) >= 2 or (pos == 0 and complete):
                return complete[-1], partial
        return None, partial


def first_seq(path: Path) -> int | None:
    """The seq of ``path``'s first record, or ``None`` when it has none."""
    with path.open("rb") as f:
        line = f.readline(1 << 20)
    try:
        return int(orjson.loads(line)["seq"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def last_link(path: Path) -> tuple[int, str] | None:
    """``(next seq, prev)`` to continue the chain after ``path``'s last
    complete record, or ``None`` when it has none."""
    line, _ = _last_line(path)
    if not line:
        return None
    try:
        record = orjson.loads(line)
        return int(record["seq"]) + 1, str(record["mac"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


@dataclass
class ActiveFile:
    """The active file, with the chain position it ends at.

    Records are copied into a shared memory map of the file, so an append is
    a copy into the OS page cache (it survives the process being killed) and
    costs no system call. The file is allocated on disk ahead of the records
    (``posix_fallocate``, ``chunk`` bytes at a time, by :meth:`grow`), so a
    copy never finds the disk full: a full disk, or a file-size limit, is
    found when growing, which raises ``OSError`` and leaves the file as it
    was. :meth:`populate` faults the allocated pages in ahead of the
    records, so a copy does not fault either. Until :meth:`close` or
    :meth:`rotate` cuts it back, the file ends in unwritten space (NUL
    bytes) past its last record: readers use :func:`read_records_bytes`.

    :meth:`open` takes the directory's lock, cuts away unwritten space a
    crash left, and continues the chain from the last record on disk. A file
    ending with a partial record (a crash mid-copy) is rotated away as it
    is, so that ``veil audit verify`` reports the damage; the new file
    continues from its last complete record.

    Not thread-safe: the writer serializes every call.
    """

    directory: Path
    fd: int
    lock_fd: int
    size: int
    opened: float
    next_seq: int
    prev: str
    first_seq: int
    chunk: int
    mapped: mmap.mmap
    capacity: int
    populated: int

    @classmethod
    def open(cls, directory: Path, chunk: int = 4 << 20) -> ActiveFile:
        """:raises DirectoryBusy: another process holds the directory.
        :raises OSError: the directory cannot be created or written, or the
            first ``chunk`` bytes cannot be allocated."""
        chunk = max(_PAGE, -(-chunk // _PAGE) * _PAGE)
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise DirectoryBusy(
                f"another process writes the audit directory {directory}; give each gateway "
                "process its own [audit] path"
            ) from None
        try:
            active = directory / ACTIVE
            next_seq, prev = 0, GENESIS
            if active.is_file():
                _cut_unwritten(active)
                _, partial = _last_line(active)
                if partial:
                    _archive(active, first_seq(active) or 0)
            files = chain_files(directory)
            for path in reversed(files):
                link = last_link(path)
                if link is not None:
                    next_seq, prev = link
                    break
            first = first_seq(active) if active.is_file() and active.stat().st_size else None
            fd, size, capacity, view = _map(active, chunk)
        except BaseException:
            os.close(lock_fd)
            raise
        start = next_seq if first is None else first
        populated = size - size % _PAGE
        return cls(
            directory, fd, lock_fd, size, time.time(), next_seq, prev, start, chunk, view,
            capacity, populated,
        )  # fmt: skip

    def write(self, data: bytes) -> None:
        """Append ``data``: all of it, or nothing (growing the file first
        when it lacks the room).

        :raises OSError: the file could not grow (full disk, size limit).
        """
        end = self.size + len(data)
        if end > self.capacity:
            self.grow(end - self.size)
        self.mapped[self.size : end] = data
        self.size = end

    def room(self) -> int:
        """Bytes allocated and mapped past the last record."""
        return self.capacity - self.size

    def grow(self, need: int = 0) -> None:
        """Allocate and map ``chunk`` more bytes (at least ``need``), so
        later appends do not fail.

        :raises OSError: the disk is full or the size limit reached; the
            file keeps its room.
        """
        capacity = self.capacity + max(self.chunk, -(-need // _PAGE) * _PAGE)
        os.posix_fallocate(self.fd, self.capacity, capacity - self.capacity)
        self.mapped.resize(capacity)
        self.capacity = capacity

    def populate(self, step: int = 64 << 10) -> bool:
        """Fault in (writable, bytes untouched) up to ``step`` more bytes of
        the room, so that copies into it do not fault. Safe beside appends
        (it changes no byte); holds the GIL for about 2 µs per 4 KiB page,
        so call it in steps. Returns whether room is left to fault in.
        Best effort: an older kernel (before Linux 5.14) leaves the pages
        to the copies."""
        start = max(self.populated, self.size - self.size % _PAGE)
        end = min(start + step, self.capacity)
        if end > start:
            with contextlib.suppress(OSError, ValueError):
                self.mapped.madvise(_MADV_POPULATE_WRITE, start, end - start)
        self.populated = end
        return end < self.capacity

    def sync(self) -> None:
        """Write the records to the disk (``fsync``: the map shares the page cache)."""
        os.fsync(self.fd)

    def due(self, max_bytes: int, max_seconds: float) -> bool:
        """Whether the file is past its size or age limit (0: no limit)."""
        return bool(
            (max_bytes and self.size >= max_bytes)
            or (max_seconds and time.time() - self.opened >= max_seconds)
        )

    def rotate(self, next_seq: int) -> int:
        """Cut the active file back to its records and rename it after its
        first record's seq and the time; start an empty one whose first
        record will be ``next_seq``. Returns the old file's descriptor, for
        the caller to ``fsync`` and close (slow: outside any lock).

        :raises OSError: the new file cannot be created or allocated (the
            old one is then still the active file).
        """
        active = self.directory / ACTIVE
        fresh = active.with_name(ACTIVE + ".next")
        fd, _, capacity, view = _map(fresh, self.chunk, empty=True)
        old_fd, old_map = self.fd, self.mapped
        old_map.close()
        os.ftruncate(old_fd, self.size)
        _archive(active, self.first_seq)
        os.replace(fresh, active)
        self.fd, self.mapped, self.capacity, self.size = fd, view, capacity, 0
        self.populated = 0
        self.first_seq = next_seq
        self.opened = time.time()
        return old_fd

    def close(self) -> None:
        """Cut the file back to its records, ``fsync`` it, release the lock."""
        try:
            self.mapped.close()
            os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            os.close(self.lock_fd)


_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+


def _map(path: Path, chunk: int, *, empty: bool = False) -> tuple[int, int, int, mmap.mmap]:
    """Open ``path`` for writing (emptied first with ``empty``), allocate
    ``chunk`` bytes past its end and map it all: ``(fd, size, capacity, map)``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if empty else 0), 0o600)
    try:
        size = os.fstat(fd).st_size
        capacity = -(-(size + chunk) // _PAGE) * _PAGE
        os.posix_fallocate(fd, size, capacity - size)
        view = mmap.mmap(fd, capacity)
    except BaseException:
        os.close(fd)
        raise
    return fd, size, capacity, view


def _cut_unwritten(path: Path) -> None:
    """Cut away the unwritten (NUL) space that a process which did not close
    ``path`` left past its records."""
    size = path.stat().st_size
    end = size
    with path.open("r+b") as f:
        while end > 0:
            step = min(1 << 20, end)
            f.seek(end - step)
            block = f.read(step)
            kept = len(block.rstrip(b"\0"))
            if kept:
                end -= step - kept
                break
            end -= step
        if end != size:
            f.truncate(end)


def read_records_bytes(path: Path) -> bytes:
    """The bytes of an audit file's records: its content without the
    unwritten (NUL) space the active file of a running (or crashed)
    gateway ends in."""
    return path.read_bytes().rstrip(b"\0")


def _archive(active: Path, first_seq: int) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = active.with_name(f"audit-{first_seq:012d}-{stamp}.jsonl")
    n = 1
    while target.exists():
        target = active.with_name(f"audit-{first_seq:012d}-{stamp}-{n}.jsonl")
        n += 1
    os.replace(active, target)
    return target
