"""The settle journal of the SQLite store: an append-only file of settled
costs, written before a settle returns and folded into SQLite every second.

Why: a SQLite transaction costs the gateway 45 to 120 µs of CPU (measured on
this project's machine), as much as the rest of the budget stage; a
``write(2)`` of a few hundred bytes 4 to 9 µs, and a copy into a memory
mapping of the file less than one. Each settle adds one frame to the
mapped file: once it returns, the frame is in the operating system's page
cache and survives the gateway process being killed, the same guarantee as
SQLite's WAL with ``synchronous=NORMAL`` (neither survives a power cut
without ``fsync``).

Format: a 16-byte header (``VEILBJ1`` + NUL + the generation, a little-endian
u64), then frames: payload length (u32), CRC-32 of the payload (u32), the
payload (JSON). A torn last frame (the process died mid-write) fails its
length or CRC check and is ignored, with everything after it.

Generations make folding idempotent: the fold commits the frames' totals to
SQLite together with "generation G is folded"; only then is the file
emptied and restarted as generation G + 1. A process that dies between the
two finds, on restart, a journal whose generation is already folded, and
skips it.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

__all__ = ["Journal", "JournalFull", "read_frames"]

_MAGIC = b"VEILBJ1\x00"
_HEADER = struct.Struct("<8sQ")
_FRAME = struct.Struct("<II")


def read_frames(path: Path) -> tuple[int | None, list[Any]]:
    """The generation and the intact frames of the journal at ``path``
    (``None`` and no frames when it is missing, empty or not a journal)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, []
    if len(data) < _HEADER.size:
        return None, []
    magic, generation = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        return None, []
    return generation, list(_frames(data, _HEADER.size))


def _frames(data: bytes, pos: int) -> Iterator[Any]:
    while pos + _FRAME.size <= len(data):
        size, crc = _FRAME.unpack_from(data, pos)
        if size == 0:
            return  # the unused, zeroed rest of the file
        start = pos + _FRAME.size
        payload = data[start : start + size]
        if len(payload) < size or zlib.crc32(payload) != crc:
            return  # torn or damaged: nothing after it can be trusted
        try:
            yield orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        pos = start + size


class JournalFull(Exception):
    """The journal file has no room for the frame: fold, then append again."""


class Journal:
    """The open journal file of one store (owned by one process).

    The file has a fixed size (allocated on disk up front, so a full disk
    shows at start-up and never as a fault mid-write) and is mapped into
    memory: an append is a copy into the page cache, with no system call,
    and survives the process being killed like a ``write(2)`` would. The
    unused rest of the file is zeros, where reading stops.

    :param size: the file's size in bytes.
    :raises OSError: the file cannot be created or allocated.
    """

    def __init__(self, path: Path, size: int = 8 << 20) -> None:
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._pos = _HEADER.size
        self._stale = size
        """Bytes from the start that may hold an earlier run's frames."""
        self.generation = 0
        self.frames = 0

    @property
    def used(self) -> int:
        """Bytes in use (the header and the frames)."""
        return self._pos

    def restart(self, generation: int) -> None:
        """Empty the journal and start ``generation`` (the header goes first,
        so a crash meanwhile leaves an empty journal, never a mixed one).

        The first restart after opening zeroes the whole file: the frames an
        earlier run left must not survive behind the new ones (a new frame
        as long as an old one would leave the next old frame intact after it,
        and a reader would take it for one of the new generation's)."""
        end = max(self._pos, self._stale)
        self._map[:end] = bytes(end)
        self._stale = 0
        self._map[: _HEADER.size] = _HEADER.pack(_MAGIC, generation)
        self._pos = _HEADER.size
        self.generation = generation
        self.frames = 0

    def append(self, record: Any) -> None:
        """Add one frame holding ``record`` (JSON-serializable).

        :raises JournalFull: no room left (fold, restart, append again).
        """
        self.append_bytes(orjson.dumps(record))

    def append_bytes(self, payload: bytes) -> None:
        """Add one frame holding ``payload``, a record already serialized as JSON.

        :raises JournalFull: no room left.
        """
        end = self._pos + _FRAME.size + len(payload)
        if end > self.size:
            raise JournalFull(f"the budget journal {self.path} is full")
        _FRAME.pack_into(self._map, self._pos, len(payload), zlib.crc32(payload))
        self._map[self._pos + _FRAME.size : end] = payload
        self._pos = end
        self.frames += 1

    def rewrite(self, payloads: list[bytes]) -> None:
        """Replace every frame with ``payloads``, in place and keeping the
        generation: the new frames overwrite the old from the start, the rest
        of the file is zeroed from its first byte on (so a reader stops
        right after the new frames), and only then is a missing header
        written. A crash before the zeroing can leave old frames readable
        after the new ones (a record read twice); one while a frame is being
        copied (microseconds) ends the journal at the torn frame.

        :raises JournalFull: the payloads do not fit.
        """
        pos = _HEADER.size
        for payload in payloads:
            end = pos + _FRAME.size + len(payload)
            if end > self.size:
                raise JournalFull(f"the budget journal {self.path} is full")
            _FRAME.pack_into(self._map, pos, len(payload), zlib.crc32(payload))
            self._map[pos + _FRAME.size : end] = payload
            pos = end
        stale = max(self._pos, self._stale)
        if stale > pos:
            self._map[pos:stale] = bytes(stale - pos)
        self._stale = 0
        self._pos = pos
        self.frames = len(payloads)
        magic, generation = _HEADER.unpack_from(self._map)
        if magic != _MAGIC:
            self.generation = max(self.generation, 1)
            self._map[: _HEADER.size] = _HEADER.pack(_MAGIC, self.generation)
        else:
            self.generation = generation

    def close(self) -> None:
        self._map.close()
