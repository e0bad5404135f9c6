"""The Redis store: budgets and rate limits shared by every gateway replica.

Every operation that changes state is one Lua script (registered once, run
with ``EVALSHA``), so it is atomic across replicas; "now" is the Redis
server's ``TIME``, so replicas with skewed clocks agree on refills, expiry
and the report's day. Redis errors (unreachable, timed out, ...) propagate
unchanged and are never retried, so a script never runs twice.

Key layout (``P`` is the prefix, ``veil:budget`` by default; ``{b}`` is a
literal Redis Cluster hash tag: every key lives in one slot, so the scripts
are cluster-safe)::

    P:{b}:c:<counter key>   hash  spent, reserved, leased   one budget in its
                                  period (leased: the part of reserved that
                                  replicas' leases hold)
                                  (e.g. P:{b}:c:team:alpha:month:2026-11);
                                  no TTL: spend survives
    P:{b}:t:<bucket key>    hash  tokens, ts        a token bucket refilled to
                                  ts (server seconds); expires once it would be
                                  full again (a missing bucket is a full one)
    P:{b}:r:<rid>           hash  amount, counters, buckets   a reservation in
                                  flight: its counter keys and the token
                                  buckets it took from ([key, take, capacity,
                                  window_s]), JSON; a replica's lease
                                  (rid ``lease:<replica>:<n>``, see
                                  :mod:`veil_budget.redis_lease`) is one too
    P:{b}:expiry            zset  rid -> deadline (server seconds)
    P:{b}:day:<YYYY-MM-DD>  hash  the spend report of a UTC day, 4 fields per
                                  (team, key_id, user, model): the JSON array
                                  of the four, then \\x1f, then ``cost``,
                                  ``calls``, ``prompt`` or ``completion``;
                                  expires 400 days after its last write
    P:{b}:days              zset  the days that have a report (all scored 0,
                                  so ``ZRANGEBYLEX`` selects days >= since)

Every script first expires the reservations whose deadline has passed (their
amounts leave the counters' reserved totals, their token buckets get back
what they took, as a release would). A reservation hash has no TTL of its
own: the expiry sweep alone removes it, so its amount can never be lost
while still counted as reserved.

Money is counted in Redis with ``HINCRBY`` (exact 64-bit integers) and
compared in Lua as (dollars, nanos) pairs, so the limit check is exact beyond
the 2**53 that Lua's doubles hold. Needs Redis 5 or later (scripts replicated
by effects, so ``TIME`` may come before writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as redis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from .redis_lease import Leases, Shape
from .redis_link import Batcher
from .redis_outbox import Outbox
from .store import Bucket, BucketState, Counter, Denied, Granted, SpendRow, Usage

__all__ = ["RedisStore"]

log = structlog.get_logger("veil.budget")

KEEP_DAYS = 400
"""Days a spend report stays in Redis after its last write."""

LINGER_S = 0.001
"""How long a settle waits for company before it goes to Redis on its own."""
DURABLE_LINGER_S = 0.01
"""The same with an outbox: a waiting settle is safe on disk, so it waits longer
and more calls share a round trip."""
RESEND_S = 5.0
"""How long after a failure the outbox's settles are sent again."""

_SEP = "\x1f"
_RESET_BATCH = 1000

# Prepended to every script. ARGV[1] is always the key base ``P:{b}:``. Keys a
# script learns while it runs (expired reservations' counters and buckets, the
# day's report) are built from the base: they share the hash tag, so they live
# in the slot of the declared KEYS.
_LIB = (
    """
local base = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local KEEP_DAYS = """
    + str(KEEP_DAYS)
    + """
local KEEP_S = KEEP_DAYS * 86400
local MAX_MS = KEEP_S * 1000

local function num(x)
  return string.format('%.17g', x)
end

-- A money string (nano-dollars, up to 2^63) as (dollars, nanos): each part
-- is exact in a double, which the whole is not beyond 2^53.
local function money(s)
  if not s then return 0, 0 end
  local sign = 1
  if string.sub(s, 1, 1) == '-' then
    sign = -1
    s = string.sub(s, 2)
  end
  local hi = 0
  if #s > 9 then hi = tonumber(string.sub(s, 1, -10)) end
  return sign * hi, sign * tonumber(string.sub(s, -9))
end

-- spent + reserved + amount <= limit, exactly.
local function fits(spent, reserved, amount, limit)
  local h1, l1 = money(spent)
  local h2, l2 = money(reserved)
  local h3, l3 = money(amount)
  local h4, l4 = money(limit)
  local hi, lo = h1 + h2 + h3 - h4, l1 + l2 + l3 - l4
  local carry = math.floor(lo / 1000000000)
  hi, lo = hi + carry, lo - carry * 1000000000
  return hi < 0 or (hi == 0 and lo == 0)
end

-- 'YYYY-MM-DD' of a count of days since 1970-01-01 (proleptic Gregorian).
local function civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02d', y, m, d)
end

-- The tokens of a bucket refilled to now, capped at capacity.
local function level(key, cap, win)
  local st = redis.call('HMGET', key, 'tokens', 'ts')
  if not st[1] then return cap end
  local elapsed = math.max(0, now - tonumber(st[2]))
  return math.min(cap, tonumber(st[1]) + elapsed * cap / win)
end

-- Store a bucket's tokens as of now; it expires once it would be full.
local function put(key, tokens, cap, win)
  if tokens >= cap then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'tokens', num(tokens), 'ts', num(now))
  local ms = math.ceil((cap - tokens) * win / cap * 1000) + 1000
  redis.call('PEXPIRE', key, string.format('%d', math.min(ms, MAX_MS)))
end

-- Forget reservation rid: its amount leaves its counters' reserved totals;
-- its token buckets get back what it took minus used (nil: nothing).
local function drop(rid, used)
  local rkey = base .. 'r:' .. rid
  local rec = redis.call('HMGET', rkey, 'amount', 'counters', 'buckets')
  redis.call('ZREM', base .. 'expiry', rid)
  if not rec[1] then return end
  redis.call('DEL', rkey)
  if rec[1] ~= '0' then
    local lease = string.sub(rid, 1, 6) == 'lease:'
    for _, c in ipairs(cjson.decode(rec[2])) do
      redis.call('HINCRBY', base .. 'c:' .. c, 'reserved', '-' .. rec[1])
      if lease then redis.call('HINCRBY', base .. 'c:' .. c, 'leased', '-' .. rec[1]) end
    end
  end
  if used then
    for _, b in ipairs(cjson.decode(rec[3])) do
      local back = b[2] - used
      if back ~= 0 then
        local key = base .. 't:' .. b[1]
        put(key, math.min(b[3], level(key, b[3], b[4]) + back), b[3], b[4])
      end
    end
  end
end

-- Append to out each counter's spent and reserved (cs: [[key, limit], ...]),
-- then each bucket's tokens (levels); the tail of a reserve's or lease's reply.
local function with_totals(out, cs, levels)
  for _, c in ipairs(cs) do
    local v = redis.call('HMGET', base .. 'c:' .. c[1], 'spent', 'reserved')
    out[#out + 1] = v[1] or '0'
    out[#out + 1] = v[2] or '0'
  end
  for j = 1, #levels do out[#out + 1] = num(levels[j]) end
  return out
end

-- Expire the reservations whose deadline has passed (as a release would).
local function sweep()
  local due = redis.call('ZRANGEBYSCORE', base .. 'expiry', '-inf', num(now))
  for _, rid in ipairs(due) do drop(rid, 0) end
end
"""
)

# The hot path: reserves, settles and releases of one turn of the event loop,
# in one call (see redis_link.Batcher). KEYS[1]: the expiry zset (it names the
# slot). ARGV[1]: base; then one operation per argument, a JSON array
# (amounts and costs are strings, exact beyond 2^53):
#   ["r", rid, amount, ttl_s, [[counter, limit], ...], [[bucket, take, capacity,
#    window_s], ...]] -> {'budget', i, spent, reserved} | {'rate', j, retry_after_s}
#    | {'ok', spent, reserved per counter..., tokens per bucket...}; a rid
#    already reserved is not taken again (a retried call): it gets 'ok' with
#    the current state.
#   ["s", rid, cost, tokens used ('' = keep what was taken), [counter, ...],
#    report field prefix, prompt tokens, completion tokens] -> 1
#   ["x", rid] -> 1 (release)
# A replica's lease (see veil_budget.redis_lease) is a reservation whose amount
# the replica spends locally; its token buckets' takes are not recorded (the
# replica gives back what it did not use with 'g'):
#   ["l", rid, want, least, headroom, ttl_s, [[counter, limit], ...], [[bucket,
#    take, least, capacity, window_s], ...]] -> {'ok' | 'no', fresh, added,
#    taken per bucket..., spent, reserved per counter..., tokens per
#    bucket...}: the lease grows by up to ``want``, as much as keeps all leases
#    on every counter together within 1/headroom of its room (a counter's
#    ``leased`` field sums them; a rid starting ``lease:`` is a lease, so per-call
#    reservations must not use that prefix), and takes up to ``take`` from
#    each bucket, as much as is within 1/headroom of its tokens (a lease past
#    that share gets nothing); if it would then hold less than ``least`` (or
#    take less than a bucket's ``least``), nothing changes ('no'). fresh = 1 if the
#    lease did not exist (first grant, or it expired). A lease that exists
#    lives ttl_s more, granted or not ('l' with want and least 0 only keeps it
#    alive). Lease amounts stay below 2^53 (the replica caps them).
#   ["c", rid, cost, back, [counter, ...], report field prefix, prompt tokens,
#    completion tokens, calls] -> 1: calls served from lease rid cost ``cost``
#    together: it becomes spent (and the report's), and cost + back leave the
#    lease (never more than it holds).
#   ["g", rid, amount, [[bucket, tokens, capacity, window_s], ...]] -> 1: the
#    lease gives ``amount`` back ('' = all of it: the lease ends), and the
#    buckets get the tokens back (up to their capacity).
# Returns one reply per operation, in order.
_BATCH = (
    _LIB
    + """
sweep()
local dkey = nil

local function reserve(op)
  local rid, amount, cs, bs = op[2], op[3], op[5], op[6]
  local rkey = base .. 'r:' .. rid
  local again = redis.call('EXISTS', rkey) == 1
  if not again then
    for i, c in ipairs(cs) do
      local v = redis.call('HMGET', base .. 'c:' .. c[1], 'spent', 'reserved')
      if not fits(v[1], v[2], amount, c[2]) then
        return {'budget', i, v[1] or '0', v[2] or '0'}
      end
    end
  end
  local levels = {}
  for j, b in ipairs(bs) do
    local tokens = level(base .. 't:' .. b[1], b[3], b[4])
    if not again and tokens < b[2] then
      return {'rate', j, num((b[2] - tokens) * b[4] / b[3])}
    end
    levels[j] = tokens
  end
  if not again then
    local counters, record = {}, {}
    for j, b in ipairs(bs) do
      levels[j] = levels[j] - b[2]
      put(base .. 't:' .. b[1], levels[j], b[3], b[4])
      if b[2] > 1 then record[#record + 1] = b end
    end
    for i, c in ipairs(cs) do
      counters[i] = c[1]
      if amount ~= '0' then
        redis.call('HINCRBY', base .. 'c:' .. c[1], 'reserved', amount)
      end
    end
    redis.call('HSET', rkey, 'amount', amount,
      'counters', #counters > 0 and cjson.encode(counters) or '[]',
      'buckets', #record > 0 and cjson.encode(record) or '[]')
    redis.call('ZADD', base .. 'expiry', num(now + tonumber(op[4])), rid)
  end
  return with_totals({'ok'}, cs, levels)
end

-- cost becomes spent in counters cs and the day's report (field prefix f).
local function spend(cost, cs, f, prompt, completion, calls)
  if cost ~= '0' then
    for _, c in ipairs(cs) do redis.call('HINCRBY', base .. 'c:' .. c, 'spent', cost) end
  end
  if not dkey then
    local dayno = math.floor(tonumber(t[1]) / 86400)
    local day = civil(dayno)
    dkey = base .. 'day:' .. day
    redis.call('ZADD', base .. 'days', 0, day)
    redis.call('ZREMRANGEBYLEX', base .. 'days', '-', '(' .. civil(dayno - KEEP_DAYS))
  end
  redis.call('HINCRBY', dkey, f .. 'cost', cost)
  redis.call('HINCRBY', dkey, f .. 'calls', calls)
  redis.call('HINCRBY', dkey, f .. 'prompt', prompt)
  redis.call('HINCRBY', dkey, f .. 'completion', completion)
end

local function settle(op)
  local used = nil
  if op[4] ~= '' then used = tonumber(op[4]) end
  drop(op[2], used)
  spend(op[3], op[5], op[6], op[7], op[8], 1)
  return 1
end

-- Lease rid hands back up to n (a number) of what it holds.
local function shrink(rid, n)
  local rkey = base .. 'r:' .. rid
  local rec = redis.call('HMGET', rkey, 'amount', 'counters')
  if not rec[1] then return end
  n = math.min(tonumber(rec[1]), n)
  if n <= 0 then return end
  local s = string.format('%d', n)
  redis.call('HINCRBY', rkey, 'amount', '-' .. s)
  for _, c in ipairs(cjson.decode(rec[2])) do
    redis.call('HINCRBY', base .. 'c:' .. c, 'reserved', '-' .. s)
    redis.call('HINCRBY', base .. 'c:' .. c, 'leased', '-' .. s)
  end
end

local function lease(op)
  local rid, want, least = op[2], tonumber(op[3]), tonumber(op[4])
  local headroom, cs, bs = op[5], op[7], op[8]
  local rkey = base .. 'r:' .. rid
  local held = redis.call('HGET', rkey, 'amount')
  local fresh = not held
  held = tonumber(held or '0')
  -- the grant: what was asked, at most what keeps all leases on each counter
  -- together within 1/headroom of its room (what they hold counted as room)
  local add = want
  local totals = {}
  for i, c in ipairs(cs) do
    local v = redis.call('HMGET', base .. 'c:' .. c[1], 'spent', 'reserved', 'leased')
    totals[i] = v
    local leased = tonumber(v[3] or '0')
    local room = tonumber(c[2]) - tonumber(v[1] or '0') - tonumber(v[2] or '0') + leased
    add = math.min(add, math.floor(room / headroom) - leased)
  end
  -- a lease past its share (the room shrank since) gets nothing more and
  -- shrinks as its calls spend it; refused: one that would hold less than least
  add = math.max(add, 0)
  local ok = held + add >= least
  local amount = string.format('%d', add)
  if ok then
    for i, c in ipairs(cs) do
      if not fits(totals[i][1], totals[i][2], amount, c[2]) then ok = false end
    end
  end
  local levels, takes = {}, {}
  for j, b in ipairs(bs) do  -- [key, take, least, capacity, window_s]
    levels[j] = level(base .. 't:' .. b[1], b[4], b[5])
    takes[j] = math.max(0, math.min(b[2], math.floor(levels[j] / headroom)))
    if takes[j] < b[3] then ok = false end
  end
  if ok then
    for j, b in ipairs(bs) do
      if takes[j] > 0 then
        levels[j] = levels[j] - takes[j]
        put(base .. 't:' .. b[1], levels[j], b[4], b[5])
      end
    end
    if add > 0 then
      for _, c in ipairs(cs) do
        redis.call('HINCRBY', base .. 'c:' .. c[1], 'reserved', amount)
        redis.call('HINCRBY', base .. 'c:' .. c[1], 'leased', amount)
      end
    end
    if fresh then
      local names = {}
      for i, c in ipairs(cs) do names[i] = c[1] end
      redis.call('HSET', rkey, 'amount', amount,
        'counters', #names > 0 and cjson.encode(names) or '[]', 'buckets', '[]')
    elseif add > 0 then
      redis.call('HINCRBY', rkey, 'amount', amount)
    end
  end
  if ok or not fresh then
    redis.call('ZADD', base .. 'expiry', num(now + tonumber(op[6])), rid)
  end
  local out = {ok and 'ok' or 'no', fresh and 1 or 0, ok and amount or '0'}
  for j = 1, #bs do out[#out + 1] = ok and takes[j] or 0 end
  return with_totals(out, cs, levels)
end

local function charge(op)
  shrink(op[2], tonumber(op[3]) + tonumber(op[4]))
  spend(op[3], op[5], op[6], op[7], op[8], op[9])
  return 1
end

local function give(op)
  if op[3] == '' then
    drop(op[2], nil)
  else
    shrink(op[2], tonumber(op[3]))
  end
  for _, b in ipairs(op[4] or {}) do
    local key = base .. 't:' .. b[1]
    put(key, math.min(b[3], level(key, b[3], b[4]) + b[2]), b[3], b[4])
  end
  return 1
end

local out = {}
for i = 2, #ARGV do
  local op = cjson.decode(ARGV[i])
  local kind = op[1]
  if kind == 'r' then
    out[#out + 1] = reserve(op)
  elseif kind == 's' then
    out[#out + 1] = settle(op)
  elseif kind == 'c' then
    out[#out + 1] = charge(op)
  elseif kind == 'l' then
    out[#out + 1] = lease(op)
  elseif kind == 'g' then
    out[#out + 1] = give(op)
  else
    drop(op[2], 0)
    out[#out + 1] = 1
  end
end
if dkey then redis.call('EXPIRE', dkey, KEEP_S) end
return out
"""
)

# KEYS: expiry, counters... ARGV: base. Returns spent, reserved per counter.
_SPENT = (
    _LIB
    + """
sweep()
local out = {}
for i = 2, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  out[#out + 1] = v[1] or '0'
  out[#out + 1] = v[2] or '0'
end
return out
"""
)

# KEYS: days. ARGV: base, first day ('-': all, '[YYYY-MM-DD': from that day).
# Returns day, HGETALL of its report, per day.
_REPORT = (
    _LIB
    + """
local out = {}
for _, day in ipairs(redis.call('ZRANGEBYLEX', KEYS[1], ARGV[2], '+')) do
  out[#out + 1] = day
  out[#out + 1] = redis.call('HGETALL', base .. 'day:' .. day)
end
return out
"""
)

# KEYS: counters. ARGV: base. Sets spent to 0 where it is not; returns how many.
_RESET = (
    _LIB
    + """
local n = 0
for i = 1, #KEYS do
  local s = redis.call('HGET', KEYS[i], 'spent')
  if s and s ~= '0' then
    redis.call('HSET', KEYS[i], 'spent', '0')
    n = n + 1
  end
end
return n
"""
)


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis ``MATCH`` pattern."""
    return "".join("\\" + ch if ch in "\\*?[]" else ch for ch in text)


def _merge_counters(counters: list[Counter]) -> dict[str, int]:
    """Counter key -> limit; a key listed twice gets the smaller limit."""
    limits: dict[str, int] = {}
    for c in counters:
        limits[c.key] = min(c.limit, limits.get(c.key, c.limit))
    return limits


def _same_buckets(shapes: tuple[tuple[str, int, float], ...], buckets: list[Bucket]) -> bool:
    """``buckets`` have the keys, capacities and windows of ``shapes``, in order."""
    if len(shapes) != len(buckets):
        return False
    for (key, capacity, window_s), b in zip(shapes, buckets, strict=True):
        if b[0] != key or b[1] != capacity or b[3] != window_s:
            return False
    return True


def _merge_buckets(buckets: list[Bucket]) -> dict[str, Bucket]:
    """Bucket key -> bucket; a key listed twice is one bucket taken from
    twice: the takes add up, the smaller capacity and the longer window apply."""
    merged: dict[str, Bucket] = {}
    for b in buckets:
        if b.capacity <= 0 or b.window_s <= 0 or b.take < 0:
            raise ValueError(f"bad bucket {b!r}: capacity and window_s > 0, take >= 0")
        seen = merged.get(b.key)
        if seen is not None:
            b = Bucket(
                b.key,
                min(seen.capacity, b.capacity),
                seen.take + b.take,
                max(seen.window_s, b.window_s),
            )
        merged[b.key] = b
    return merged


class RedisStore:
    """A :class:`~veil_budget.store.Store` in Redis, shared by replicas (see
    the module doc for the key layout and the scripts).

    Every method is one round trip (``reset``: a ``SCAN`` then one script per
    1000 counters) and atomic with respect to every other replica's calls.
    Redis errors propagate (``redis.exceptions.ConnectionError``,
    ``TimeoutError``, ...); nothing is retried, except the settles an outbox
    keeps (sent again ``RESEND_S`` after a failure).

    :param url: ``redis://`` or ``rediss://`` URL.
    :param prefix: the keys' prefix; must not hold ``{`` or ``}`` (the hash
        tag ``{b}`` follows it).
    :param timeout_s: connect and socket timeout, so a hung Redis fails the
        call instead of hanging it; also the longest wait for a free
        connection when ``max_connections`` are busy.
    :param max_connections: the size of the connection pool; more calls at
        once wait for a connection (each script takes well under a
        millisecond) instead of failing.
    :param lease_calls: a lease holds this many calls' worst case (0: no
        leases, see :mod:`veil_budget.redis_lease`).
    :param outbox_dir: keep every settle in an outbox in this directory
        until Redis acknowledges it (see :mod:`veil_budget.redis_outbox`),
        so a killed process loses none; ``None``: settles waiting for their
        batch are lost with the process.
    :raises ValueError: a prefix with braces.
    :raises OSError: the outbox cannot be opened.
    :raises RuntimeError: an outbox asked for outside a running event loop.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "veil:budget",
        timeout_s: float = 2.0,
        max_connections: int = 50,
        lease_calls: int = 0,
        lease_headroom: int = 20,
        lease_ttl_s: float = 60.0,
        outbox_dir: Path | None = None,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the Redis key prefix {prefix!r} must not contain {{ or }}")
        self.prefix = prefix
        self.base = f"{prefix}:{{b}}:"
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self.client: redis.Redis = redis.Redis.from_pool(pool)
        if outbox_dir is not None:
            asyncio.get_running_loop()  # its timers send the outbox's settles again
        self.outbox = Outbox(outbox_dir) if outbox_dir is not None else None
        linger_s = LINGER_S if self.outbox is None else DURABLE_LINGER_S
        self._batch = Batcher(
            url, _BATCH, f"{self.base}expiry", self.base, timeout_s=timeout_s, linger_s=linger_s
        )
        self.leases = (
            Leases(
                self._batch.submit,
                lease_calls=lease_calls,
                headroom=lease_headroom,
                ttl_s=lease_ttl_s,
                linger_s=linger_s,
                outbox=self.outbox,
            )
            if lease_calls > 0
            else None
        )
        self._resend_timer: asyncio.TimerHandle | None = None
        self._closed = False
        if self.outbox is not None and self.outbox.unacked():
            self._resend_soon(0.0)  # what a dead process left
        if self.leases is not None:
            self.leases.on_charge_failed = self._charges_failed
            self._batch.on_lost = self.leases.lost
        self._fields: dict[tuple[str, ...], str] = {}
        self._shapes: dict[tuple[Counter, ...], tuple[Any, ...]] = {}
        """:meth:`_prepare`'s memo: counters -> (their buckets' shapes, merged
        counters, shape, whether a bucket key repeats)."""
        self.settle_failed: Callable[[], None] | None = None
        """Called for each settle that failed (the stage counts them)."""
        register = self.client.register_script
        self._spent: AsyncScript = register(_SPENT)
        self._report: AsyncScript = register(_REPORT)
        self._reset: AsyncScript = register(_RESET)

    # -- keys -------------------------------------------------------------------

    def counter_key(self, key: str) -> str:
        """The Redis key of the counter ``key``."""
        return f"{self.base}c:{key}"

    def bucket_key(self, key: str) -> str:
        """The Redis key of the token bucket ``key``."""
        return f"{self.base}t:{key}"

    # -- the Store protocol ---------------------------------------------------------

    async def reserve(
        self,
        rid: str,
        amount: int,
        counters: list[Counter],
        buckets: list[Bucket],
        ttl_s: float,
    ) -> Granted | Denied:
        """See :meth:`veil_budget.store.Store.reserve`. Counters are checked
        before buckets; the first that refuses is the :class:`Denied` one. A
        ``rid`` already reserved (and not yet settled, released or expired)
        is not taken again: the call gets :class:`Granted` with the current
        totals.

        :raises ValueError: a negative ``amount``, a ``ttl_s`` not positive,
            or a bucket with a capacity or window not positive.
        """
        if amount < 0:
            raise ValueError(f"amount must be >= 0, not {amount}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, not {ttl_s}")
        limits, shape, merged = self._prepare(counters, buckets)
        leases = self.leases
        if leases is not None:
            granted = leases.reserve(rid, amount, shape, merged)
            if granted is not None:
                return granted
        op = orjson.dumps(
            [
                "r",
                rid,
                str(amount),
                float(ttl_s),
                [[key, str(limit)] for key, limit in limits.items()],
                [[b.key, b.take, b.capacity, float(b.window_s)] for b in merged.values()],
            ]
        )
        reply: Any = await self._batch.submit(op)
        if reply[0] != "ok" and leases is not None:
            # room of this replica's lease: granted while the call was on its
            # way (it covers the call), or a remnant too small for it (it goes
            # back, and the call is checked again)
            granted = leases.retake(rid, amount, shape, merged)
            if granted is not None:
                return granted
            if reply[0] == "budget" and leases.shed(shape, amount):
                reply = await self._batch.submit(op)
        if reply[0] == "budget":
            key = list(limits)[int(reply[1]) - 1]
            return Denied("budget", key, None, int(reply[2]) + int(reply[3]))
        if reply[0] == "rate":
            key = list(merged)[int(reply[1]) - 1]
            return Denied("rate", key, float(reply[2]))
        committed = {}
        i = 1
        for key in limits:
            committed[key] = int(reply[i]) + int(reply[i + 1])
            i += 2
        states: dict[str, BucketState] = {}
        for b in merged.values():
            tokens = float(reply[i])
            i += 1
            reset_s = max(0.0, (b.capacity - tokens) * b.window_s / b.capacity)
            states[b.key] = BucketState(max(0, math.floor(tokens)), reset_s)
        if leases is not None:
            leases.want(amount, shape, merged)
        return Granted(committed, states)

    def _prepare(
        self, counters: list[Counter], buckets: list[Bucket]
    ) -> tuple[dict[str, int], Shape, dict[str, Bucket]]:
        """The merged counters (key -> limit), the call's :data:`Shape` and
        its merged buckets (key -> bucket, this call's takes). The first two
        are worked out once per set of counters and bucket shapes (a caller
        has the same ones call after call); the buckets are merged per call
        only when a key repeats.

        :raises ValueError: a bucket with a capacity or window not positive,
            or a negative take.
        """
        ident = tuple(counters)
        memo = self._shapes.get(ident)
        if memo is None or not _same_buckets(memo[0], buckets):
            merged = _merge_buckets(buckets)
            limits = _merge_counters(counters)
            shape = (
                tuple(limits.items()),
                tuple((key, b.capacity, float(b.window_s)) for key, b in merged.items()),
            )
            if len(self._shapes) >= 4096:
                self._shapes.clear()
            shapes = tuple((b.key, b.capacity, b.window_s) for b in buckets)
            self._shapes[ident] = (shapes, limits, shape, len(merged) < len(buckets))
            return limits, shape, merged
        _, limits, shape, repeats = memo
        if repeats:
            return limits, shape, _merge_buckets(buckets)
        merged = {}
        for b in buckets:
            if b[2] < 0:
                raise ValueError(f"bad bucket {b!r}: take >= 0")
            merged[b[0]] = b
        return limits, shape, merged

    async def settle(
        self, rid: str, cost: int, counters: list[str], tokens: int | None, usage: Usage
    ) -> None:
        """See :meth:`veil_budget.store.Store.settle` (runs :meth:`settle_now`)."""
        self.settle_now(rid, cost, counters, tokens, usage)

    def settle_now(
        self, rid: str, cost: int, counters: list[str], tokens: int | None, usage: Usage
    ) -> None:
        """:meth:`settle` without a coroutine: it never waits. The report's
        day is the Redis server's UTC day.

        Returns once the settle is queued (and, with an outbox, kept in it):
        it goes to Redis with the next reserve of this process, or on its
        own within ``LINGER_S`` (``DURABLE_LINGER_S`` with an outbox), and
        its reservation keeps counting in full until it lands (so the
        budget's bound holds meanwhile). A settle that fails is logged with
        its cost and counted by ``settle_failed``; with an outbox it is
        sent again ``RESEND_S`` later, without one it is lost (the
        reservation then expires). :meth:`spent`, :meth:`report`, :meth:`reset` and
        :meth:`close` first wait for the settles queued before them.

        :raises ValueError: a negative ``cost``.
        """
        if cost < 0:
            raise ValueError(f"cost must be >= 0, not {cost}")
        field = self._fields.get(usage[:4])
        if field is None:
            if len(self._fields) > 10_000:
                self._fields.clear()
            # JSON escapes every control character, so the separator cannot occur in it
            field = self._fields[usage[:4]] = (
                json.dumps(list(usage[:4]), ensure_ascii=False, separators=(",", ":")) + _SEP
            )
        if self.leases is not None and self.leases.settle(rid, cost, tokens, field, usage):
            return
        op = orjson.dumps(
            [
                "s",
                rid,
                str(cost),
                "" if tokens is None else str(tokens),
                list(dict.fromkeys(counters)),
                field,
                usage.prompt_tokens,
                usage.completion_tokens,
            ]
        )
        kept = self.outbox.add(op) if self.outbox is not None else 0
        future = self._batch.submit(op, urgent=False)
        future.add_done_callback(lambda f: self._settled(f, rid, cost, kept))

    def _settled(self, future: asyncio.Future[Any], rid: str, cost: int, kept: int) -> None:
        error = None if future.cancelled() else future.exception()
        if error is None and not future.cancelled():
            if kept and self.outbox is not None:
                self.outbox.ack((kept,))
            return
        log.error(
            "budget_settle_failed",
            request_id=rid,
            error="cancelled" if error is None else type(error).__name__,
            cost_usd=f"{cost / 1e9:.6f}",
            resent=bool(kept),
        )
        if kept and self.outbox is not None:
            self.outbox.failed((kept,))
            self._resend_soon(RESEND_S)
        if self.settle_failed is not None:
            self.settle_failed()

    def _charges_failed(self, calls: int, cost: int, error: BaseException) -> None:
        log.error(
            "budget_settle_failed",
            calls=calls,
            error=type(error).__name__,
            cost_usd=f"{cost / 1e9:.6f}",
            resent=self.outbox is not None,
        )
        if self.outbox is not None:
            self._resend_soon(RESEND_S)
        if self.settle_failed is not None:
            for _ in range(calls):
                self.settle_failed()

    # -- the outbox -----------------------------------------------------------------

    def _resend_soon(self, delay_s: float) -> None:
        if self._resend_timer is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._resend_timer = loop.call_later(delay_s, self._resend)

    def _resend(self) -> None:
        """Send the outbox's due settles again (each in its own operation:
        a lease's calls as plain spend if the lease is gone)."""
        self._resend_timer = None
        outbox = self.outbox
        if outbox is None or self._closed:
            return
        for kept, op in outbox.due():
            future = self._batch.submit(op, urgent=False)
            future.add_done_callback(functools.partial(self._resent, kept))

    def _resent(self, kept: int, future: asyncio.Future[Any]) -> None:
        outbox = self.outbox
        if outbox is None:
            return
        if not future.cancelled() and future.exception() is None:
            outbox.ack((kept,))
        else:
            outbox.failed((kept,))
            self._resend_soon(RESEND_S)

    async def drain(self) -> None:
        """Send the charges and settles that wait, and wait for their replies."""
        await self._batch.drain()
        if self.leases is not None:
            self.leases.flush()
            if self.leases.sent:
                await asyncio.wait(list(self.leases.sent))

    async def release(self, rid: str) -> None:
        """See :meth:`veil_budget.store.Store.release`."""
        if self.leases is not None and self.leases.release(rid):
            return
        await self._batch.submit(orjson.dumps(["x", rid]))

    async def spent(self, keys: list[str]) -> dict[str, tuple[int, int]]:
        """See :meth:`veil_budget.store.Store.spent`. Expired reservations are
        expired first, so ``reserved`` counts only live ones."""
        await self.drain()
        unique = list(dict.fromkeys(keys))
        redis_keys = [f"{self.base}expiry"] + [self.counter_key(k) for k in unique]
        values: Any = await self._spent(keys=redis_keys, args=[self.base])
        return {key: (int(values[2 * i]), int(values[2 * i + 1])) for i, key in enumerate(unique)}

    async def report(self, since: str | None = None) -> list[SpendRow]:
        """See :meth:`veil_budget.store.Store.report`. Rows come sorted by
        day, team, key, user and model; ``since`` compares as a string (like
        the SQLite store: ``2026-11`` selects November 2026 onwards)."""
        await self.drain()
        first = "-" if since is None else "[" + since
        reply: Any = await self._report(keys=[f"{self.base}days"], args=[self.base, first])
        rows: list[SpendRow] = []
        for d in range(0, len(reply), 2):
            day, flat = reply[d], reply[d + 1]
            sums: dict[tuple[str, ...], dict[str, int]] = {}
            for f in range(0, len(flat), 2):
                head, _, kind = flat[f].rpartition(_SEP)
                ident = tuple(json.loads(head))
                sums.setdefault(ident, {})[kind] = int(flat[f + 1])
            for (team, key_id, user, model), v in sums.items():
                rows.append(
                    SpendRow(
                        day,
                        team,
                        key_id,
                        user,
                        model,
                        v.get("cost", 0),
                        v.get("calls", 0),
                        v.get("prompt", 0),
                        v.get("completion", 0),
                    )
                )
        rows.sort(key=lambda r: (r.day, r.team, r.key_id, r.user, r.model))
        return rows

    async def reset(self, pattern: str) -> int:
        """See :meth:`veil_budget.store.Store.reset`. ``pattern`` is a glob
        over counter keys as in the SQLite store's ``GLOB``: ``*``, ``?`` and
        ``[...]`` (a backslash is literal). Counts the counters whose spent
        was not already 0. Each batch of 1000 counters is reset atomically;
        a counter created after the ``SCAN`` passed is not reset."""
        await self.drain()
        match = _glob_escape(self.counter_key("")) + pattern.replace("\\", "\\\\")
        found = [key async for key in self.client.scan_iter(match=match, count=1000)]
        unique = list(dict.fromkeys(found))
        count = 0
        for i in range(0, len(unique), _RESET_BATCH):
            batch = unique[i : i + _RESET_BATCH]
            count += int(await self._reset(keys=batch, args=[self.base]))
        return count

    async def close(self) -> None:
        """Give the leases back, send what waits, close the connections and
        the outbox (what Redis did not acknowledge stays in it, for the
        next process to send)."""
        if self.leases is not None:
            await self.leases.close()
        if self.leases is not None or self.outbox is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drain(), self._batch.timeout_s)
        self._closed = True
        if self._resend_timer is not None:
            self._resend_timer.cancel()
            self._resend_timer = None
        await self._batch.close()
        await self.client.aclose()
        if self.outbox is not None:
            self.outbox.close()
