"""The Redis store: shared by every gateway replica, encrypted at rest.

Key names (``P`` is the policy's ``prefix``, ``T`` a hash of the team id, in
braces so that a team's keys share one Redis Cluster slot)::

    P:{T}:e:<exact key>      one answer: AES-GCM sealed, with EX = ttl_s
    P:{T}:p:<partition key>  a list of sealed (answer key, question vector) records,
                             trimmed to max_per_partition, EX = ttl_s
    P:stats                  a hash of counters every replica adds to
    P:keycheck               a sealed marker: a replica with another key refuses to start

Values are sealed with the key name as associated data (:mod:`veil_cache.seal`),
so Redis (or whoever reads its memory, dumps or replicas) sees only ciphertext,
and an entry copied under another team's name does not open.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import structlog

from .embed import DIM, Vector
from .keys import team_tag
from .seal import SealBroken, Sealer

__all__ = ["RedisStore", "WrongKey"]

log = structlog.get_logger("veil.cache")

_KEY_LEN = 64  # hex sha256
_FLUSH_S = 1.0


class WrongKey(RuntimeError):
    """The Redis store's entries were sealed with another key."""


class RedisStore:
    """See the module doc."""

    name = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        key: bytes,
        *,
        prefix: str,
        ttl_s: int,
        max_entry_bytes: int,
        max_per_partition: int = 1000,
    ) -> None:
        self.redis: Any = aioredis.Redis.from_url(url)
        self.sealer = Sealer(key)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.max_per_partition = max_per_partition
        self._tags: dict[str, str] = {}
        self._pending: dict[str, int] = {}
        self._flush_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def _team(self, team: str) -> str:
        tag = self._tags.get(team)
        if tag is None:
            if len(self._tags) > 10_000:
                self._tags.clear()
            tag = self._tags[team] = f"{self.prefix}:{{{team_tag(team)}}}"
        return tag

    async def check_key(self) -> None:
        """Refuse a key other than the one the store's entries were sealed with.

        :raises WrongKey: the marker does not open with this key.
        """
        name = f"{self.prefix}:keycheck".encode()
        sealed = await self.redis.get(name)
        if sealed is None:
            await self.redis.set(name, self.sealer.seal(name, b"veil-cache"), nx=True)
            return
        try:
            self.sealer.open(name, sealed)
        except SealBroken:
            raise WrongKey(
                "the Redis cache holds entries sealed with another key: give every replica "
                "the same key, or clear the cache's keys in Redis after a key change"
            ) from None

    async def get(self, team: str, key: str) -> bytes | None:
        name = f"{self._team(team)}:e:{key}".encode()
        sealed = await self.redis.get(name)
        if sealed is None:
            return None
        try:
            return self.sealer.open(name, sealed)
        except SealBroken:
            log.error("cache_entry_unreadable", store="redis")
            return None

    async def put(self, team: str, key: str, value: bytes) -> bool:
        if len(value) > self.max_entry_bytes:
            return False
        name = f"{self._team(team)}:e:{key}".encode()
        await self.redis.set(name, self.sealer.seal(name, value), ex=self.ttl_s)
        return True

    async def add_vector(self, team: str, partition: str, key: str, vector: Vector) -> None:
        name = f"{self._team(team)}:p:{partition}".encode()
        record = self.sealer.seal(name, key.encode() + vector.astype(np.float32).tobytes())
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(name, record)
        pipe.ltrim(name, -self.max_per_partition, -1)
        pipe.expire(name, self.ttl_s)
        await pipe.execute()

    async def nearest(self, team: str, partition: str, vector: Vector) -> tuple[str, float] | None:
        name = f"{self._team(team)}:p:{partition}".encode()
        records = await self.redis.lrange(name, 0, -1)
        if not records:
            return None
        return await asyncio.to_thread(self._best, name, records, vector)

    def _best(self, name: bytes, records: list[bytes], vector: Vector) -> tuple[str, float] | None:
        keys: list[str] = []
        rows: list[bytes] = []
        for sealed in records:
            try:
                plain = self.sealer.open(name, sealed)
            except SealBroken:
                continue
            if len(plain) != _KEY_LEN + DIM * 4:
                continue
            keys.append(plain[:_KEY_LEN].decode())
            rows.append(plain[_KEY_LEN:])
        if not rows:
            return None
        matrix = np.frombuffer(b"".join(rows), dtype=np.float32).reshape(len(rows), DIM)
        scores = matrix @ vector
        best = int(np.argmax(scores))
        return keys[best], float(scores[best])

    async def _scan_delete(self, pattern: str) -> int:
        deleted = 0
        batch: list[bytes] = []
        async for name in self.redis.scan_iter(match=pattern, count=1000):
            batch.append(name)
            if len(batch) >= 500:
                deleted += await self.redis.unlink(*batch)
                batch = []
        if batch:
            deleted += await self.redis.unlink(*batch)
        return deleted

    async def _scan_count(self, pattern: str) -> int:
        n = 0
        async for _ in self.redis.scan_iter(match=pattern, count=1000):
            n += 1
        return n

    async def clear(self, team: str | None) -> int:
        if team is None:
            entries = await self._scan_count(f"{self.prefix}:{{*}}:e:*")
            await self._scan_delete(f"{self.prefix}:{{*}}:*")
            return entries
        base = self._team(team)
        entries = await self._scan_count(f"{base}:e:*")
        await self._scan_delete(f"{base}:*")
        return entries

    async def stats(self) -> dict[str, Any]:
        await self._flush()
        raw = await self.redis.hgetall(f"{self.prefix}:stats")
        counters = {k.decode(): int(v) for k, v in raw.items()}
        return {
            "store": self.name,
            "entries": await self._scan_count(f"{self.prefix}:{{*}}:e:*"),
            "shared": counters,
        }

    def count(self, what: str) -> None:
        """Add one to a shared counter; written at most once a second."""
        self._pending[what] = self._pending.get(what, 0) + 1
        now = time.monotonic()
        if now >= self._flush_at:
            self._flush_at = now + _FLUSH_S
            task = asyncio.ensure_future(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for k, v in pending.items():
                pipe.hincrby(f"{self.prefix}:stats", k, v)
            await pipe.execute()
        except Exception as e:  # noqa: BLE001 - counters are best effort
            log.warning("cache_stats_not_written", error=type(e).__name__)

    async def close(self) -> None:
        await self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()
