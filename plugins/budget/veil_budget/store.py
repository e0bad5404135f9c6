"""The storage contract of budgets and rate limits, shared by the SQLite and
Redis stores.

The values passed on the hot path are named tuples (immutable, and several
times cheaper to build than frozen dataclasses).

Money is counted in integer nano-dollars (``NANO`` per USD): sums stay exact
across millions of calls and fit Redis' 64-bit integers (up to about 9
billion USD).

A call first :meth:`Store.reserve` s its worst-case cost against every
budget that applies to it (its :class:`Counter` s) and takes from its rate
limits' token buckets (:class:`Bucket` s), in one atomic step: either every
check passes and everything is taken, or nothing is. After the call it
:meth:`Store.settle` s the actual cost (the rest of the reservation comes
back) or :meth:`Store.release` s it all. A reservation not settled within its
time to live (the gateway died mid-call) expires and comes back by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = [
    "NANO",
    "Bucket",
    "BucketState",
    "Counter",
    "Denied",
    "Granted",
    "SpendRow",
    "Store",
    "Usage",
]

NANO = 1_000_000_000
"""Nano-dollars per US dollar."""


class Counter(NamedTuple):
    """One budget in its current period: ``key`` names it (``team:alpha:month:2026-11``),
    ``limit`` is the hard limit in nano-dollars."""

    key: str
    limit: int


class Bucket(NamedTuple):
    """A token bucket of a rate limit: holds at most ``capacity``, refills
    ``capacity`` per ``window_s`` seconds continuously; a call takes ``take``
    (1 for a requests-per-minute limit, the call's token estimate for a
    tokens-per-minute one)."""

    key: str
    capacity: int
    take: int
    window_s: float = 60.0


class BucketState(NamedTuple):
    """A bucket after the call took from it: whole units left, and seconds
    until it is full again."""

    remaining: int
    reset_s: float


class Granted(NamedTuple):
    """The reservation is in place. ``committed`` maps each counter key to
    its spent plus reserved nano-dollars, this reservation included."""

    committed: dict[str, int]
    buckets: dict[str, BucketState]


class Denied(NamedTuple):
    """Nothing was taken. ``key`` is the counter or bucket that refused;
    ``retry_after_s`` is when a bucket will hold enough (``None`` for a
    budget: it comes back with the next period, or never)."""

    kind: str  # "budget" or "rate"
    key: str
    retry_after_s: float | None = None
    committed: int = 0


class Usage(NamedTuple):
    """What a settled call cost, for the spend report."""

    team: str
    key_id: str
    user: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class SpendRow:
    """Settled spend of one (day, team, key, user, model)."""

    day: str
    team: str
    key_id: str
    user: str
    model: str
    cost: int
    calls: int
    prompt_tokens: int
    completion_tokens: int


class Store(Protocol):
    """Where spend, reservations and rate-limit buckets live.

    Every method is atomic with respect to every other call of any gateway
    process sharing the store. A method that cannot reach its storage raises
    (the stage then refuses the call, or with ``fail = "open"`` serves it
    unmetered).
    """

    async def reserve(
        self,
        rid: str,
        amount: int,
        counters: list[Counter],
        buckets: list[Bucket],
        ttl_s: float,
    ) -> Granted | Denied:
        """Reserve ``amount`` nano-dollars on every counter and take from
        every bucket, or nothing at all.

        First, reservations whose time to live has passed are expired (their
        amounts leave the counters' reserved totals). Then a counter refuses
        when its spent + reserved + ``amount`` exceeds its limit (a counter
        listed twice is checked against the smaller limit); a bucket refuses
        when, refilled to now, it holds less than its ``take``. When none
        refuses, the reservation ``rid`` is recorded with ``amount``, the
        counter keys and what it took from each bucket whose take is more
        than 1 (token buckets), expiring in ``ttl_s``.
        """
        ...

    async def settle(
        self, rid: str, cost: int, counters: list[str], tokens: int | None, usage: Usage
    ) -> None:
        """Commit ``cost`` nano-dollars on ``counters`` and drop the
        reservation ``rid`` (its amount leaves the reserved totals; if it
        already expired, the cost is still committed). Token buckets the
        reservation took from get back what it took minus ``tokens`` (the
        actual count; ``None``: keep what was taken). ``usage`` is added to
        the day's spend report (``cost``, one call, its tokens)."""
        ...

    async def release(self, rid: str) -> None:
        """Drop the reservation ``rid`` without cost; token buckets get back
        what it took. Unknown or expired ``rid``: nothing happens."""
        ...

    async def spent(self, keys: list[str]) -> dict[str, tuple[int, int]]:
        """``(spent, reserved)`` nano-dollars of each counter key (0, 0 when unknown)."""
        ...

    async def report(self, since: str | None = None) -> list[SpendRow]:
        """Settled spend rows of every day ``>= since`` (``YYYY-MM-DD``; ``None``: all)."""
        ...

    async def reset(self, pattern: str) -> int:
        """Set the spent total of every counter whose key matches ``pattern``
        (``*`` matches any run of characters) to 0; returns how many."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...
