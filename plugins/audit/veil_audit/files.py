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
import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from .chain import GENESIS

__all__ = ["ACTIVE", "ActiveFile", "DirectoryBusy", "chain_files", "first_seq", "last_link"]

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
    """The active file, open for appending, with the chain position it ends at.

    :meth:`open` takes the directory's lock, and continues the chain from the
    last record on disk. A file ending with a partial record (a crash or a
    full disk mid-write) is rotated away as it is, so that ``veil audit
    verify`` reports the damage; the new file continues from its last
    complete record.
    """

    directory: Path
    fd: int
    lock_fd: int
    size: int
    opened: float
    next_seq: int
    prev: str
    first_seq: int

    @classmethod
    def open(cls, directory: Path) -> ActiveFile:
        """:raises DirectoryBusy: another process holds the directory.
        :raises OSError: the directory cannot be created or written."""
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
                _, partial = _last_line(active)
                if partial:
                    _archive(active, first_seq(active) or 0)
            files = chain_files(directory)
            for path in reversed(files):
                link = last_link(path)
                if link is not None:
                    next_seq, prev = link
                    break
            fd = os.open(active, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            first = first_seq(active) if active.stat().st_size else None
        except BaseException:
            os.close(lock_fd)
            raise
        size = os.fstat(fd).st_size
        start = next_seq if first is None else first
        return cls(directory, fd, lock_fd, size, time.time(), next_seq, prev, start)

    def write(self, data: bytes) -> None:
        """Append ``data`` with ``write(2)`` (all of it, or raise). On a failure
        the file is cut back to where it was, so no partial record stays.

        :raises OSError: the write failed (full disk, I/O error).
        """
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.size += len(data)

    def sync(self) -> None:
        os.fsync(self.fd)

    def due(self, max_bytes: int, max_seconds: float) -> bool:
        """Whether the file is past its size or age limit (0: no limit)."""
        return bool(
            (max_bytes and self.size >= max_bytes)
            or (max_seconds and time.time() - self.opened >= max_seconds)
        )

    def rotate(self, next_seq: int) -> Path:
        """Close the active file, rename it after its first record's seq and
        the time, and start an empty one whose first record will be ``next_seq``."""
        os.fsync(self.fd)
        os.close(self.fd)
        done = _archive(self.directory / ACTIVE, self.first_seq)
        self.first_seq = next_seq
        self.fd = os.open(self.directory / ACTIVE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = 0
        self.opened = time.time()
        return done

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            os.close(self.lock_fd)


def _archive(active: Path, first_seq: int) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = active.with_name(f"audit-{first_seq:012d}-{stamp}.jsonl")
    n = 1
    while target.exists():
        target = active.with_name(f"audit-{first_seq:012d}-{stamp}-{n}.jsonl")
        n += 1
    os.replace(active, target)
    return target
