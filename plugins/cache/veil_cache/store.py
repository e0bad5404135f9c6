"""Where cached answers live: the interface, and the in-process memory store.

A store keeps, per team, answers by exact key (opaque bytes: the redacted
answer, serialized) and, for the semantic cache, per partition, the vectors
of the questions asked with the exact key of their answer. Both expire after
the policy's TTL. :class:`MemoryStore` bounds itself by entries and by bytes
(least recently used first); the Redis store (:mod:`veil_cache.redis_store`)
by TTL and Redis' own memory policy.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .embed import DIM, Vector

__all__ = ["ENTRY_OVERHEAD", "MemoryStore", "Store"]

ENTRY_OVERHEAD = 160
"""Bytes counted per memory entry beyond its value (key, bookkeeping)."""


class Store(Protocol):
    """What the cache stage needs from storage. Every method may raise on a
    storage failure; the stage then serves the call uncached."""

    name: str

    async def get(self, team: str, key: str) -> bytes | None:
        """The value stored under ``key`` for ``team``, or ``None``."""

    async def put(self, team: str, key: str, value: bytes) -> bool:
        """Store ``value``; ``False`` when it is too large to keep."""

    async def add_vector(self, team: str, partition: str, key: str, vector: Vector) -> None:
        """Remember that the question ``vector`` of ``partition`` has the answer ``key``."""

    async def nearest(self, team: str, partition: str, vector: Vector) -> tuple[str, float] | None:
        """The stored answer key of the most similar question of ``partition``,
        with its cosine similarity; ``None`` when the partition is empty."""

    async def clear(self, team: str | None) -> int:
        """Delete ``team``'s entries (all teams' with ``None``); how many."""

    async def stats(self) -> dict[str, Any]:
        """``entries``, ``bytes`` (when known) and shared counters."""

    shared: bool
    """Whether several gateways share it (and :meth:`count`'s counters)."""

    def count(self, what: str) -> None:
        """Add one to a shared counter (``hits``, ``misses``...); only for shared stores."""

    async def close(self) -> None:
        """Release connections."""


@dataclass(slots=True)
class _Partition:
    """The questions of one partition: one row of ``matrix`` per key."""

    matrix: np.ndarray[Any, np.dtype[np.float32]]
    keys: list[str] = field(default_factory=list)
    expires: list[float] = field(default_factory=list)


class MemoryStore:
    """In-process store: an LRU of entries bounded by ``max_entries`` and by
    ``max_bytes`` (values plus :data:`ENTRY_OVERHEAD` each), and numpy
    matrices of question vectors per partition (``max_per_partition`` rows;
    partitions themselves LRU-bounded by ``max_entries``)."""

    name = "memory"
    shared = False

    def __init__(
        self,
        *,
        ttl_s: float,
        max_entries: int,
        max_bytes: int,
        max_entry_bytes: int,
        max_per_partition: int = 1000,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.max_per_partition = max_per_partition
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()
        self._partitions: OrderedDict[tuple[str, str], _Partition] = OrderedDict()

    def get_now(self, team: str, key: str) -> bytes | None:
        """:meth:`get` without a coroutine: the memory store never waits, so
        the cache stage calls this one directly (a coroutine saved per call)."""
        k = (team, key)
        found = self._entries.get(k)
        if found is None:
            return None
        if found[0] <= time.monotonic():
            self._drop(k)
            return None
        self._entries.move_to_end(k)
        return found[1]

    async def get(self, team: str, key: str) -> bytes | None:
        return self.get_now(team, key)

    def _drop(self, k: tuple[str, str]) -> None:
        _, value = self._entries.pop(k)
        self.bytes -= len(value) + ENTRY_OVERHEAD

    def put_now(self, team: str, key: str, value: bytes) -> bool:
        """:meth:`put` without a coroutine (see :meth:`get_now`)."""
        n = len(value)
        cap = self.max_bytes
        if n > self.max_entry_bytes or n + ENTRY_OVERHEAD > cap:
            return False
        k = (team, key)
        entries = self._entries
        old = entries.pop(k, None)
        if old is not None:
            self.bytes -= len(old[1]) + ENTRY_OVERHEAD
        total = self.bytes + n + ENTRY_OVERHEAD  # with the new entry
        if len(entries) >= self.max_entries or total > cap:  # full: evict the oldest
            evict = entries.popitem
            limit = self.max_entries
            while entries and (len(entries) >= limit or total > cap):
                total -= len(evict(last=False)[1][1]) + ENTRY_OVERHEAD
        entries[k] = (time.monotonic() + self.ttl_s, value)
        self.bytes = total
        return True

    async def put(self, team: str, key: str, value: bytes) -> bool:
        return self.put_now(team, key, value)

    async def add_vector(self, team: str, partition: str, key: str, vector: Vector) -> None:
        k = (team, partition)
        part = self._partitions.get(k)
        now = time.monotonic()
        if part is None:
            while len(self._partitions) >= self.max_entries:
                self._partitions.popitem(last=False)
            part = self._partitions[k] = _Partition(np.empty((0, DIM), dtype=np.float32))
        else:
            self._partitions.move_to_end(k)
        live = [i for i, t in enumerate(part.expires) if t > now]
        if len(live) != len(part.keys):  # drop expired rows
            part.matrix = part.matrix[live]
            part.keys = [part.keys[i] for i in live]
            part.expires = [part.expires[i] for i in live]
        part.matrix = np.vstack([part.matrix, vector.reshape(1, DIM)])[-self.max_per_partition :]
        part.keys = (part.keys + [key])[-self.max_per_partition :]
        part.expires = (part.expires + [now + self.ttl_s])[-self.max_per_partition :]

    async def nearest(self, team: str, partition: str, vector: Vector) -> tuple[str, float] | None:
        part = self._partitions.get((team, partition))
        if part is None or not part.keys:
            return None
        scores = part.matrix @ vector
        best = int(np.argmax(scores))
        if part.expires[best] <= time.monotonic():
            return None
        return part.keys[best], float(scores[best])

    async def clear(self, team: str | None) -> int:
        if team is None:
            n = len(self._entries)
            self._entries.clear()
            self._partitions.clear()
            self.bytes = 0
            return n
        doomed = [k for k in self._entries if k[0] == team]
        for k in doomed:
            self._drop(k)
        for p in [p for p in self._partitions if p[0] == team]:
            del self._partitions[p]
        return len(doomed)

    async def stats(self) -> dict[str, Any]:
        return {
            "store": self.name,
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "partitions": len(self._partitions),
        }

    def count(self, what: str) -> None:
        return None

    async def close(self) -> None:
        return None
