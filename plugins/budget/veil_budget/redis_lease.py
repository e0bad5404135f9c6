"""Leases: a replica serves calls from a slice of a shared budget it holds.

With the Redis store, every call's check-and-reserve is a round trip, and at
low concurrency the event loop sleeps until the reply: the wake-up costs
about as much CPU as the budget stage's own work. A lease removes it while a
budget has plenty of room. A replica asks Redis, in one script call, for a
*lease* on the budgets and rate limits of one kind of call (one caller's set
of counters and token buckets): a reservation of ``lease_calls`` times the
call's worst case in every counter, and as many requests and tokens from
every bucket. It then reserves the next calls of that kind from the lease,
in memory, and sends their costs to Redis in batches (``charge``); the
lease is topped up in the background before it runs dry.

Why the bound still holds: a lease is an ordinary reservation in Redis (the
same hash, the same expiry sweep), so every replica's check counts it in
full. A replica reserves locally only what its lease still holds, so spent
plus reserved in Redis never falls below what the replica has committed.

Why a nearly full budget stays exact: Redis grants leases only while all the
leases on a budget, from every replica and for every kind of call, hold
together at most ``1 / lease_headroom`` of its room (what they hold counted
as room; each bucket: a lease takes at most that share of its tokens); when
the room shrank since, the leases get nothing more and shrink as their calls
spend them. When a lease would hold
less than two calls' worth, Redis refuses it, the replica gives back what it
holds, and its calls go back to one exact check-and-reserve each (for a
second, then it asks again). So the leases keep at most ``1 / lease_headroom``
of a budget's room (as it was when they were last topped up) away from the
calls that go to Redis. Within one replica nothing of it is lost: a call
Redis refuses is served from the replica's lease when that covers it (a lease
granted while the call was on its way), and a remnant too small for a call
goes back ahead of that call's reserve (or, when Redis refused the call,
before it is checked again). Another replica's lease comes
back when its calls run it dry or after ``idle_s`` without calls: until then,
calls elsewhere may be refused with that much room left (never more than the
budget is spent).

A lease starts at ``lease_calls`` calls and doubles, up to 16 times that, each
time a call finds it dry (more calls in flight than it was sized for), and
each time it needs topping up within a second of its last top-up (more calls
a second than it was sized for: at 1,000 calls a second, a lease of 16 calls
would cost a round trip every 8 calls, one of 256 every 128).

What a lease changes: the remaining-budget and rate-limit headers of a call
served from a lease are the totals Redis reported at the lease's last top-up
or keep-alive, less what the replica has used since (other replicas' spend
shows at the next one). A lease unused for ``idle_s`` is given back, tokens
included, and so is every lease when the store closes or its connection to
Redis is lost (calls then go to Redis, which refuses them if it is gone). A
replica killed with its leases strands them until they expire
(``lease_ttl_s`` after their last top-up or keep-alive); while a lease has
calls in flight, a keeper keeps it alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from .redis_outbox import Outbox
from .store import Bucket, BucketState, Granted

__all__ = ["Lease", "Leases"]

log = structlog.get_logger("veil.budget")

Shape = tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int, float], ...]]
"""A kind of call: its (counter key, limit) and (bucket key, capacity, window)."""

_MAX_AMOUNT = 2**50
"""The largest lease in nano-dollars (about $1.1M); the script adds lease amounts as doubles."""
_MAX_LEASES = 1024
_MAX_GROWTH = 16
"""A lease that runs dry, or is topped up often, grows up to this many times ``lease_calls``."""
_OFTEN_S = 1.0
"""A lease topped up again within this long doubles."""
_RETRY_S = 1.0
"""How long a kind of call goes without a lease after Redis refused one."""
_new = tuple.__new__  # a NamedTuple without its Python-level __new__ (see stage.py)


def _short(lease: Lease, amount: int, buckets: dict[str, Bucket]) -> bool:
    """``lease`` does not hold ``amount`` or a bucket's take."""
    tokens = lease.tokens
    return lease.held < amount or any(tokens[key] < b.take for key, b in buckets.items())


def _charge_op(
    lease: Lease, cost: int, back: int, field: str, prompt: int, completion: int, calls: int
) -> bytes:
    """The script's ``"c"`` operation: ``calls`` calls served from ``lease``
    cost ``cost`` together, and ``back`` more leaves the lease."""
    return orjson.dumps(
        ["c", lease.rid, str(cost), str(back), list(lease.limits), field, prompt, completion, calls]
    )


def _low(lease: Lease, amount: int, buckets: dict[str, Bucket], calls: int) -> bool:
    """``lease`` holds less than ``calls`` calls of ``amount`` and the buckets' takes."""
    tokens = lease.tokens
    return lease.held < amount * calls or any(
        tokens[key] < b.take * calls for key, b in buckets.items()
    )


class Lease:
    """One replica's lease on one :data:`Shape` (see the module doc).

    ``held`` is what calls may still reserve locally (nano-dollars), ``tokens``
    the requests or tokens held per bucket. ``known`` and ``levels`` are
    Redis's totals at the last reply. The lease is usable until
    ``deadline - min_life`` (local monotonic clock, measured from before the
    request that set it, so never later than Redis's own deadline)."""

    __slots__ = (
        "busy",
        "calls",
        "closing",
        "deadline",
        "ended",
        "held",
        "inflight",
        "known",
        "levels",
        "limits",
        "rid",
        "shape",
        "tokens",
        "topped_at",
        "used_at",
        "windows",
    )

    def __init__(self, rid: str, shape: Shape, calls: int) -> None:
        self.rid = rid
        self.shape = shape
        self.calls = calls
        self.limits = dict(shape[0])
        self.windows = {key: (capacity, window) for key, capacity, window in shape[1]}
        self.held = 0
        self.tokens = dict.fromkeys(self.windows, 0.0)
        self.inflight = 0
        self.deadline = 0.0
        self.known = dict.fromkeys(self.limits, 0)
        self.levels = {key: float(cw[0]) for key, cw in self.windows.items()}
        self.busy = False
        self.closing = False
        self.ended = False
        self.used_at = time.monotonic()
        self.topped_at = 0.0


class Leases:
    """The leases of one :class:`~veil_budget.redis_store.RedisStore`.

    :param submit: queues one operation of the store's script (its bytes)
        and returns the future of its reply; ``urgent=False`` may wait
        for company.
    :param lease_calls: a lease holds this many times the worst case of the
        call that asks for it.
    :param headroom: the leases on a counter hold together at most
        1/headroom of its room (each lease at most that share of a bucket's
        tokens), as of their last top-up.
    :param ttl_s: Redis forgets a lease not topped up or kept alive for this long.
    :param idle_s: a lease unused for this long is given back.
    :param linger_s: charges wait this long for company (as the store's settles do).
    :param outbox: where each call's charge is kept until Redis acknowledges
        it (see :mod:`veil_budget.redis_outbox`); a charge whose sending
        fails is marked due again there.
    """

    def __init__(
        self,
        submit: Callable[..., asyncio.Future[Any]],
        *,
        lease_calls: int,
        headroom: int,
        ttl_s: float = 60.0,
        idle_s: float = 10.0,
        linger_s: float = 0.001,
        outbox: Outbox | None = None,
    ) -> None:
        self._submit = submit
        self.outbox = outbox
        self.lease_calls = lease_calls
        self.headroom = headroom
        self.ttl_s = ttl_s
        self.idle_s = idle_s
        self.min_life = ttl_s / 2
        self._prefix = f"lease:{uuid.uuid4().hex[:16]}:"
        self._count = 0
        self._by_shape: dict[Shape, Lease] = {}
        self._closing: set[Lease] = set()
        self._refused: dict[Shape, float] = {}
        self._served: dict[str, tuple[Lease, int, tuple[tuple[str, int], ...]]] = {}
        self._keeper: asyncio.Task[None] | None = None
        self.linger_s = linger_s
        self._charges: dict[tuple[str, str], list[Any]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.sent: set[asyncio.Future[Any]] = set()
        """Charges sent and not answered yet."""
        self.on_charge_failed: Callable[[int, int, BaseException], None] | None = None
        """Called with the calls, their cost and the error when charges fail."""
        self.served = 0
        """Calls reserved from a lease."""
        self.missed = 0
        """Calls of a kind with a lease that it could not serve (reserved in Redis)."""
        self.expired = 0
        """Leases Redis had forgotten when this replica still held them (counted, logged)."""

    # -- the hot path -----------------------------------------------------------

    def reserve(
        self, rid: str, amount: int, shape: Shape, buckets: dict[str, Bucket]
    ) -> Granted | None:
        """Reserve ``amount`` and the buckets' takes from the lease on
        ``shape``; ``None`` when there is none or it does not cover them
        (the caller reserves in Redis, then calls :meth:`want`)."""
        lease = self._by_shape.get(shape)
        if lease is None:
            return None
        now = time.monotonic()
        short = _short(lease, amount, buckets)
        if short or lease.deadline - now < self.min_life:
            self.missed += 1
            if short and lease.calls < self.lease_calls * _MAX_GROWTH:
                lease.calls *= 2  # more calls in flight than it was sized for
            self._shed(lease, amount)  # goes ahead of this call's reserve in Redis
            if not lease.busy:  # run dry, or not kept alive: top it up
                self._grow(lease, amount, buckets)
            return None
        return self._serve(lease, now, rid, amount, buckets)

    def retake(
        self, rid: str, amount: int, shape: Shape, buckets: dict[str, Bucket]
    ) -> Granted | None:
        """Reserve a call Redis refused from the lease on ``shape`` if it now
        covers the call: a lease granted while the call was on its way holds
        room of this replica that the call may use. ``None`` (and nothing
        changed) otherwise."""
        lease = self._by_shape.get(shape)
        if lease is None:
            return None
        now = time.monotonic()
        if _short(lease, amount, buckets) or lease.deadline - now < self.min_life:
            return None
        return self._serve(lease, now, rid, amount, buckets)

    def shed(self, shape: Shape, amount: int) -> bool:
        """Give back what the lease on ``shape`` holds if that is less than
        ``amount`` (a call Redis refused: the remnant may be the room it
        needs); ``True`` if something went back (ahead of the next
        operation this replica sends)."""
        lease = self._by_shape.get(shape)
        return lease is not None and self._shed(lease, amount)

    def _shed(self, lease: Lease, amount: int) -> bool:
        """Give back a remnant of ``lease`` too small for a call of ``amount``:
        near a limit it would keep room from the very call that needs it."""
        if not 0 < lease.held < amount:
            return False
        self._give(lease, lease.held)
        lease.held = 0
        return True

    def _serve(
        self, lease: Lease, now: float, rid: str, amount: int, buckets: dict[str, Bucket]
    ) -> Granted:
        """Reserve ``amount`` and the buckets' takes from ``lease``, which covers them."""
        tokens = lease.tokens
        lease.held -= amount
        takes = []
        for key, b in buckets.items():
            tokens[key] -= b.take
            if b.take > 1:
                takes.append((key, b.take))
        lease.inflight += 1
        lease.used_at = now
        self.served += 1
        self._served[rid] = (lease, amount, tuple(takes))
        if not lease.busy:
            if _low(lease, amount, buckets, lease.calls // 2 + 1):
                if (
                    now - lease.topped_at < _OFTEN_S
                    and lease.calls < self.lease_calls * _MAX_GROWTH
                ):
                    lease.calls *= 2  # more calls a second than it was sized for
                self._grow(lease, amount, buckets)
            elif lease.deadline - now < self.ttl_s * 0.75:
                self._grow(lease, amount, buckets)
        held = lease.held
        committed = {key: total - held for key, total in lease.known.items()}
        states = {}
        levels = lease.levels
        for key, (capacity, window) in lease.windows.items():
            left = levels[key] + tokens[key]
            reset_s = (capacity - left) * window / capacity
            states[key] = _new(
                BucketState, (math.floor(left) if left > 0 else 0, reset_s if reset_s > 0 else 0.0)
            )
        return _new(Granted, (committed, states))

    def want(self, amount: int, shape: Shape, buckets: dict[str, Bucket]) -> None:
        """A call of ``shape`` was reserved in Redis: ask for a lease on its
        kind (in the background) unless one is held or was refused lately."""
        if self.lease_calls <= 0 or shape in self._by_shape or len(self._by_shape) >= _MAX_LEASES:
            return
        now = time.monotonic()
        refused = self._refused.get(shape)
        if refused is not None and now < refused:
            return
        self._count += 1
        lease = self._by_shape[shape] = Lease(
            f"{self._prefix}{self._count}", shape, self.lease_calls
        )
        self._grow(lease, amount, buckets)
        if self._keeper is None:
            self._keeper = asyncio.ensure_future(self._keep())

    def settle(self, rid: str, cost: int, tokens: int | None, field: str, usage: Any) -> bool:
        """Charge a call served from a lease (sent with the others of the
        next ``linger_s``, one operation per lease and report row); ``False``
        if ``rid`` was not served from a lease."""
        served = self._served.pop(rid, None)
        if served is None:
            return False
        lease, amount, takes = served
        lease.inflight -= 1
        back = 0
        if lease.closing:
            back = max(0, amount - cost)
        else:
            lease.held = max(0, lease.held + amount - cost)
            if tokens is not None:
                for bucket, took in takes:
                    if took > tokens:
                        lease.tokens[bucket] += took - tokens
        row = (lease.rid, field)
        charge = self._charges.get(row)
        if charge is None:
            charge = self._charges[row] = [0, 0, 0, 0, 0, lease, []]
        charge[0] += cost
        charge[1] += back
        charge[2] += 1
        charge[3] += usage.prompt_tokens
        charge[4] += usage.completion_tokens
        outbox = self.outbox
        if outbox is not None:  # this call alone, as plain spend if its lease is gone
            op = _charge_op(lease, cost, 0, field, usage.prompt_tokens, usage.completion_tokens, 1)
            charge[6].append(outbox.add(op))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.linger_s, self.flush)
        if lease.closing:
            self._finish(lease)
        return True

    def flush(self) -> None:
        """Send the charges that wait (before any other operation on a lease,
        and before the store reads or resets totals)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._charges:
            return
        charges, self._charges = self._charges, {}
        for (_, field), (cost, back, calls, prompt, completion, lease, ids) in charges.items():
            future = self._submit(_charge_op(lease, cost, back, field, prompt, completion, calls))
            self.sent.add(future)
            future.add_done_callback(functools.partial(self._charged, calls, cost, ids))

    def _charged(self, calls: int, cost: int, ids: list[int], future: asyncio.Future[Any]) -> None:
        self.sent.discard(future)
        if future.cancelled():
            error: BaseException | None = asyncio.CancelledError()
        else:
            error = future.exception()
        outbox = self.outbox
        if error is None:
            if outbox is not None:
                outbox.ack(ids)
            return
        if outbox is not None:
            outbox.failed(ids)
        if self.on_charge_failed is not None:
            self.on_charge_failed(calls, cost, error)

    def release(self, rid: str) -> bool:
        """Give a call's reservation back to its lease; ``False`` if ``rid``
        was not served from one."""
        served = self._served.pop(rid, None)
        if served is None:
            return False
        lease, amount, takes = served
        lease.inflight -= 1
        if lease.closing:
            self._give(lease, amount, list(takes))
            self._finish(lease)
        else:
            lease.held += amount
            for key, took in takes:
                lease.tokens[key] += took
        return True

    # -- growing, keeping and giving back ------------------------------------------

    def _grow(self, lease: Lease, amount: int, buckets: dict[str, Bucket]) -> None:
        """Top ``lease`` up towards ``lease.calls`` calls of ``amount`` and the
        buckets' takes (Redis grants less near a limit, nothing below two
        calls' worth); this also keeps it alive."""
        calls = lease.calls
        lease.topped_at = time.monotonic()
        size = min(amount * calls, _MAX_AMOUNT)
        parts = []
        for key, (capacity, window) in lease.windows.items():
            b = buckets.get(key)
            take = b.take if b is not None else 0
            want = max(0, take * calls - math.ceil(lease.tokens[key]))
            least = 0 if lease.tokens[key] >= take * 2 else take
            parts.append([key, want, least, capacity, window])
        self._send(lease, max(0, size - lease.held), amount * 2, parts)

    def _send(self, lease: Lease, want: int, least: int, parts: list[list[Any]]) -> None:
        self.flush()
        lease.busy = True
        sent = time.monotonic()
        op = orjson.dumps(
            [
                "l",
                lease.rid,
                str(want),
                str(least),
                self.headroom,
                self.ttl_s,
                [[key, str(limit)] for key, limit in lease.limits.items()],
                parts,
            ]
        )
        self._submit(op).add_done_callback(lambda f: self._granted(f, lease, sent))

    def _granted(self, future: asyncio.Future[Any], lease: Lease, sent: float) -> None:
        lease.busy = False
        if future.cancelled() or future.exception() is not None:
            error = "cancelled" if future.cancelled() else type(future.exception()).__name__
            log.warning("budget_lease_failed", lease=lease.rid, error=error)
            if lease.closing:
                self._close(lease)
            elif lease.deadline == 0.0 and lease.inflight == 0:  # never granted
                self._forget(lease)
                self._refused[lease.shape] = time.monotonic() + _RETRY_S
            return
        reply = future.result()
        ok, fresh = reply[0] == "ok", int(reply[1]) == 1
        if fresh and lease.deadline != 0.0:
            # Redis expired it while this replica held it: what it held is gone
            self.expired += 1
            log.error("budget_lease_expired", lease=lease.rid, held_nanos=lease.held)
            lease.held = 0
            lease.tokens = dict.fromkeys(lease.tokens, 0.0)
        i = 3
        if ok:
            lease.held += int(reply[2])
            for key in lease.windows:
                lease.tokens[key] += int(reply[i])
                i += 1
        else:
            i += len(lease.windows)
        for key in lease.limits:
            lease.known[key] = int(reply[i]) + int(reply[i + 1])
            i += 2
        for key in lease.windows:
            lease.levels[key] = float(reply[i])
            i += 1
        if ok:
            lease.deadline = sent + self.ttl_s
            if lease.closing:  # closed while this was on its way
                self._close(lease)
            return
        if not fresh:
            lease.deadline = sent + self.ttl_s
        if len(self._refused) > 10_000:
            self._refused.clear()
        self._refused[lease.shape] = time.monotonic() + _RETRY_S
        self._close(lease, "refused: too close to a limit")

    def _close(self, lease: Lease, reason: str | None = None) -> None:
        """Stop serving from ``lease``, give back what it holds; in-flight
        calls give theirs back as they settle. ``reason``: why (logged once)."""
        if not lease.closing:
            lease.closing = True
            self._forget(lease)
            self._closing.add(lease)
            log.info("budget_lease_closed", lease=lease.rid, reason=reason, held_nanos=lease.held)
        if lease.busy:
            return  # _granted closes it again, with what the pending grant adds
        tokens = lease.tokens
        if lease.held or any(v >= 1 for v in tokens.values()):
            self._give(lease, lease.held, [(k, math.floor(v)) for k, v in tokens.items()])
            lease.held = 0
            lease.tokens = dict.fromkeys(tokens, 0.0)
        self._finish(lease)

    def _give(
        self, lease: Lease, amount: int, tokens: list[tuple[str, int]] | tuple[()] = ()
    ) -> None:
        """Give ``amount`` and the buckets' ``tokens`` back to Redis."""
        self.flush()
        back = [[k, n, *lease.windows[k]] for k, n in tokens if n >= 1]
        if amount > 0 or back:
            self._submit(orjson.dumps(["g", lease.rid, str(amount), back]), urgent=False)

    def _finish(self, lease: Lease) -> None:
        """End a closing lease once no call is in flight on it."""
        if lease.closing and lease.inflight == 0 and not lease.busy and not lease.ended:
            lease.ended = True
            self._closing.discard(lease)
            self.flush()
            self._submit(orjson.dumps(["g", lease.rid, ""]), urgent=False)

    def _forget(self, lease: Lease) -> None:
        if self._by_shape.get(lease.shape) is lease:
            del self._by_shape[lease.shape]

    async def _keep(self) -> None:
        """Give back idle leases; keep alive those with calls in flight."""
        period = min(self.idle_s, self.ttl_s / 4) / 2
        while True:
            await asyncio.sleep(period)
            self.tend(time.monotonic())

    def tend(self, now: float) -> None:
        """One pass of the keeper (see :meth:`_keep`): a closing lease is kept
        alive while calls it reserved for are in flight."""
        for lease in [*self._by_shape.values(), *self._closing]:
            if lease.busy:
                continue
            if not lease.closing and now - lease.used_at > self.idle_s and lease.inflight == 0:
                self._close(lease, "idle")
            elif lease.deadline - now < self.ttl_s * 0.75 and (
                not lease.closing or lease.inflight > 0
            ):
                keep = [[k, 0, 0, cw[0], cw[1]] for k, cw in lease.windows.items()]
                self._send(lease, 0, 0, keep)

    async def close(self) -> None:
        """Give every lease back (calls still in flight give theirs as they settle)."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        for lease in list(self._by_shape.values()):
            self._close(lease, "shutdown")
        self.flush()

    def lost(self) -> None:
        """The connection to Redis is gone: serve nothing more from the
        leases (a call now goes to Redis, which refuses it or reconnects)
        and give them back once it can."""
        for lease in list(self._by_shape.values()):
            self._close(lease, "Redis connection lost")

    def open(self) -> int:
        """How many leases are open."""
        return len(self._by_shape)

    def held(self) -> dict[str, int]:
        """Nano-dollars the open leases hold, per counter (for tests and metrics)."""
        out: dict[str, int] = {}
        for lease in self._by_shape.values():
            for key in lease.limits:
                out[key] = out.get(key, 0) + lease.held
        return out
