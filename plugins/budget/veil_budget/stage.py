"""The ``budget`` stage: reserve the worst case, serve, settle the real cost.

``on_request``:

1. bounds the call's output: a chat call that asks for no ``max_tokens`` /
   ``max_completion_tokens`` gets ``max_completion_tokens =
   default_max_tokens``; a per-call cap (``max_call_usd``) lowers it further
   when the worst case would cost more;
2. prices the worst case: an upper bound on the prompt tokens
   (:mod:`veil_budget.tokens`) at the highest input price, plus the output
   cap times ``n`` at the highest output price, over the deployments the
   call may reach (its route; without one, every deployment its team may
   use);
3. reserves it on every budget that applies (gateway, team, key, user) and
   takes from the rate-limit buckets, in one atomic step of the store; a
   budget that cannot fit refuses with 429 ``insufficient_quota`` /
   ``budget_exceeded`` naming it, a bucket with 429 ``rate_limit_exceeded``
   and ``Retry-After``; nothing is taken then;
4. sets the response headers: OpenAI's ``x-ratelimit-*`` and
   ``x-veil-budget-remaining-usd`` (and ``x-veil-budget-soft-limit`` once a
   soft limit is passed).

``on_response`` settles the cost from the upstream's ``usage`` at the
deployment's prices (counted with tiktoken when a stream had none) and
releases the rest; a call a stage answered (a cache hit) costs nothing.
``on_error`` settles what the upstream already spent (usage known, or the
part of a stream that was produced) and releases the rest; a call that
never reached the upstream gives its whole reservation back.

If the store cannot be reached, the call is refused (503
``budget_unavailable``), unless the policy runs the plugin with ``fail =
"open"``: then it is served unmetered, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import structlog

from veil import BadRequest, Call, GatewayError, Principal, Refused
from veil import Unavailable as VeilUnavailable
from veil.types import Deployment
from veil.types import Usage as CallUsage

from .metrics import BudgetMetrics
from .rules import Applied, applicable, period_end, rate_buckets
from .settings import BudgetSettings, RateLimitRule
from .store import NANO, Bucket, BucketState, Counter, Denied, Store, Usage
from .tokens import (
    count_tokens,
    encoding_ready,
    load_encoding_soon,
    prompt_text,
    prompt_token_bound,
    text_token_bound,
)

__all__ = ["BudgetStage", "open_store"]

log = structlog.get_logger("veil.budget")

_STATE = "budget"
_new = tuple.__new__
"""``_new(NamedTupleClass, (fields...))``: the instance without the class's
Python-level ``__new__`` (every field given, in order; a fifth of the cost)."""


class Unavailable(VeilUnavailable):
    """503 ``budget_unavailable``: the store cannot be reached."""

    code = "budget_unavailable"


def open_store(settings: BudgetSettings, state_dir: Path | None = None) -> Store:
    """The store the settings name (SQLite file or Redis URL from the
    environment), with its files (the SQLite file; the Redis store's outbox)
    under ``state_dir`` (default ``$VEIL_STATE_DIR``, else the working
    directory).

    :raises ValueError: the Redis URL variable is not set.
    :raises StoreBusy: another process owns the SQLite file.
    :raises OSError: the Redis store's outbox cannot be created.
    """
    if settings.store == "redis":
        url = os.environ.get(settings.redis_url_env)
        if not url:
            raise ValueError(
                f'[budget] store = "redis" needs the Redis URL in ${settings.redis_url_env}'
            )
        from .redis_store import RedisStore

        return RedisStore(
            url,
            lease_calls=settings.lease_calls,
            lease_headroom=settings.lease_headroom,
            outbox_dir=_state_dir(state_dir),
        )
    from .sqlite_store import open_sqlite

    return open_sqlite(sqlite_path(settings, state_dir))


def _state_dir(state_dir: Path | None) -> Path:
    return state_dir or Path(os.environ.get("VEIL_STATE_DIR") or ".")


def sqlite_path(settings: BudgetSettings, state_dir: Path | None = None) -> Path:
    """The SQLite file: absolute, or under ``state_dir`` (default
    ``$VEIL_STATE_DIR``, else the working directory)."""
    path = Path(settings.sqlite_path)
    if not path.is_absolute():
        path = _state_dir(state_dir) / path
    return path


def _usd(nanos: int) -> str:
    return "%.6f" % (nanos / NANO) if nanos > 0 else "0.000000"


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``120ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms" if seconds > 0 else "0ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(slots=True)
class _Plan:
    """What applies to one caller during one minute (periods start on whole
    minutes), worked out once: its budgets and their counters (one per key,
    the smaller limit winning), per-call caps, soft limits and rate-limit
    buckets (``shapes``: each taking 1; a call takes its tokens from a copy
    of a token bucket)."""

    minute: int
    applied: list[Applied]
    counters: list[Counter]
    keys: list[str]
    caps: list[tuple[Applied, int]]
    soft: list[Applied]
    shapes: list[tuple[RateLimitRule, str, Bucket]]
    buckets: list[Bucket]
    """The shapes' buckets, as the store takes them (a token bucket's
    ``take`` is replaced by each call's tokens)."""
    token_slots: tuple[int, ...]
    """Where the token buckets are in ``buckets``."""
    rate_headers: tuple[tuple[str, str, str, str, str], ...] | None
    """With at most one bucket of each kind (nothing to choose per call):
    each bucket's key, its limit header's name and value, and the names of
    its remaining and reset headers; ``None``: :func:`_rate_headers` picks
    the tightest per call."""


class BudgetStage:
    """See the module doc. One per policy load; the store is shared."""

    name = "budget"

    def __init__(self, settings: BudgetSettings, *, fail_open: bool = False) -> None:
        self.settings = settings
        self.fail_open = fail_open
        self.active = bool(settings.budgets or settings.rate_limits)
        self.store: Store | None = None
        self.metrics: BudgetMetrics | None = None
        self._plans: dict[tuple[str, str, str | None], _Plan] = {}
        self._prices: dict[tuple[Deployment, ...], tuple[float, float]] = {}
        self._team_prices: dict[str, tuple[Any, tuple[float, float]]] = {}
        self._spend: dict[tuple[str, str], int] | None = None  # the metrics' spend_nanos
        self._tasks: set[asyncio.Future[None]] = set()
        self._rid_prefix = f"v{uuid.uuid4().hex[:16]}:"
        self._rids = itertools.count()

    async def start(
        self, metrics: BudgetMetrics | None = None, state_dir: Path | None = None
    ) -> None:
        """Open the store (see :func:`open_store`)."""
        self.metrics = metrics
        self._spend = metrics.spend_nanos if metrics is not None else None
        if self.store is None:
            self.store = open_store(self.settings, state_dir)
        if hasattr(self.store, "settle_failed"):  # settles that fail after returning
            self.store.settle_failed = lambda: self._count("store_error", "settle")
        leases = getattr(self.store, "leases", None)
        if leases is not None and metrics is not None:
            metrics.track(leases)
        outbox = getattr(self.store, "outbox", None)
        if outbox is not None and metrics is not None:
            metrics.track_outbox(outbox)
        if self.active:
            load_encoding_soon()  # for streams that end without usage; loads off the loop

    async def close(self) -> None:
        """Close the store (a SQLite file stays open while another policy uses it)."""
        if self.store is not None:
            store, self.store = self.store, None
            await store.close()
            leases = getattr(store, "leases", None)
            if leases is not None and self.metrics is not None:
                self.metrics.untrack(leases)
            outbox = getattr(store, "outbox", None)
            if outbox is not None and self.metrics is not None:
                self.metrics.untrack_outbox(outbox)

    # -- request ------------------------------------------------------------------

    async def on_request(self, call: Call) -> None:
        """Bound, price and reserve the call (see the module doc).

        :raises Refused: 429, a budget or rate limit does not fit.
        :raises BadRequest: 400, the prompt alone exceeds a per-call cap.
        :raises Unavailable: 503, the store is unreachable (``fail`` closed).
        """
        if not self.active:
            return
        s = self.settings
        request = call.request
        chat = call.kind == "chat"
        n = request.get("n", 1) if chat else 1
        if type(n) is not int or n < 1:
            n = 1
        output = _output_cap(call, s.default_max_tokens) if chat else 0
        in_price, out_price = self._worst_prices(call)
        prompt = prompt_token_bound(call.kind, request, s.image_tokens)
        plan = self._plan_of(call.principal)
        amount = _nanos(prompt, in_price, output * n, out_price)
        for a, cap in plan.caps:
            if amount <= cap:
                continue
            room = cap - _nanos(prompt, in_price, 0, 0)
            fits = int(room // (n * out_price * 1000)) if out_price and chat else 0
            if fits < 1:
                self._count("refused", "per_call")
                call.decide(self.name, "refused", reason="per_call_cap", budget=a.rule.name)
                raise BadRequest(
                    f"this call could cost more than the {a.rule.name} allows per call "
                    f"(${a.rule.max_call_usd:g}); shorten the prompt",
                    code="max_call_cost_exceeded",
                    param="messages" if chat else "input",
                )
            output = min(output, fits)
            _set_output_cap(request, output)
            amount = _nanos(prompt, in_price, output * n, out_price)
        tokens = prompt + output * n
        takes = plan.buckets  # a request bucket takes 1: the plan's own
        if plan.token_slots:  # a token bucket takes this call's tokens: a copy
            takes = takes.copy()
            for i in plan.token_slots:
                b = takes[i]
                if tokens > b[1]:
                    self._too_many_tokens(call, plan.shapes[i][0], b, tokens)
                takes[i] = _new(Bucket, (b[0], b[1], tokens, b[3]))
        store = self.store
        # the store's id of this reservation: never the request id, which the
        # client may choose (two calls sharing one would share one reservation)
        rid = f"{self._rid_prefix}{next(self._rids):x}"
        try:
            if store is None:
                raise RuntimeError("the budget store is not open")
            reserve_now = getattr(store, "reserve_now", None)  # one that never waits
            if reserve_now is not None:
                result = reserve_now(rid, amount, plan.counters, takes, s.reservation_ttl_s)
            else:
                result = await store.reserve(rid, amount, plan.counters, takes, s.reservation_ttl_s)
        except asyncio.CancelledError:  # the client left: the reservation may be in place
            if store is not None:
                self._release_later(store, rid, call.id)
            raise
        except Exception as e:  # noqa: BLE001 - any store failure: refuse or serve unmetered
            self._count("store_error", "reserve")
            log.error(
                "budget_store_failed", request_id=call.id, op="reserve", error=type(e).__name__
            )
            if self.fail_open:
                call.decide(self.name, "unmetered", error=type(e).__name__)
                return
            raise Unavailable(
                "the budget store is unavailable, so the call cannot be metered; the request "
                "was not forwarded"
            ) from None
        if type(result) is Denied:
            self._refuse(call, result, plan, takes, amount)
        headers = call.response_headers
        template = plan.rate_headers
        if template is not None:
            states = result.buckets
            for key, limit_name, capacity, remaining_name, reset_name in template:
                state = states.get(key)
                if state is not None:
                    units, reset = state
                    headers[limit_name] = capacity
                    headers[remaining_name] = str(units) if units > 0 else "0"
                    headers[reset_name] = (
                        f"{int(reset * 1000)}ms" if 0 < reset < 1 else _duration(reset)
                    )
        elif takes:
            shapes = [
                (rule, kind, b) for (rule, kind, _), b in zip(plan.shapes, takes, strict=True)
            ]
            _rate_headers(headers, shapes, result.buckets)
        if plan.applied:
            committed = result.committed
            remaining = None
            for key, limit in plan.counters:
                left = limit - committed[key]
                if remaining is None or left < remaining:
                    remaining = left
            headers["x-veil-budget-remaining-usd"] = _usd(remaining or 0)
            if plan.soft:
                self._soft(call, plan.soft, committed)
        # the call's one decision is made when it is settled or released
        call.scratch[_STATE] = [plan.keys, amount, False, rid, len(plan.applied)]
        if call.stream:  # for a stream that ends without usage: counted then
            call.stream_chunks = []

    def _release_later(self, store: Store, rid: str, request_id: str) -> None:
        """Release reservation ``rid`` in the background (its call was
        cancelled while reserving, so it cannot await)."""

        async def release() -> None:
            try:
                await store.release(rid)
            except Exception as e:  # noqa: BLE001 - the reservation expires by itself
                self._count("store_error", "release")
                log.error(
                    "budget_store_failed",
                    request_id=request_id,
                    op="release",
                    error=type(e).__name__,
                )

        task = asyncio.ensure_future(release())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _soft(self, call: Call, soft: list[Applied], committed: dict[str, int]) -> None:
        over = [a for a in soft if committed[a.counter.key] > (a.soft or 0)]
        if not over:
            return
        names = ", ".join(a.rule.name for a in over)
        call.response_headers["x-veil-budget-soft-limit"] = "exceeded: " + names
        for a in over:
            self._count("soft_limit", a.rule.scope)
        log.warning(
            "budget_soft_limit_exceeded",
            request_id=call.id,
            budgets=[a.rule.name for a in over],
        )

    def _plan_of(self, principal: Principal) -> _Plan:
        """This caller's :class:`_Plan` for the current minute."""
        minute = int(time.time() // 60)
        key = (principal.team, principal.key_id, principal.user)
        plan = self._plans.get(key)
        if plan is None or plan.minute != minute:
            if len(self._plans) > 10_000:
                self._plans.clear()
            plan = self._plans[key] = self._make_plan(principal, minute)
        return plan

    def _make_plan(self, principal: Principal, minute: int) -> _Plan:
        now = dt.datetime.fromtimestamp(minute * 60 + 30, dt.UTC)
        applied = applicable(self.settings.budgets, principal, now)
        limits: dict[str, int] = {}
        for a in applied:
            limits[a.counter.key] = min(a.counter.limit, limits.get(a.counter.key, a.counter.limit))
        shapes = rate_buckets(self.settings.rate_limits, principal, 1)
        return _Plan(
            minute=minute,
            applied=applied,
            counters=[Counter(k, v) for k, v in limits.items()],
            keys=list(limits),
            caps=[
                (a, round(a.rule.max_call_usd * NANO))
                for a in applied
                if a.rule.max_call_usd is not None
            ],
            soft=[a for a in applied if a.soft is not None],
            shapes=shapes,
            buckets=[bucket for _, _, bucket in shapes],
            token_slots=tuple(i for i, shape in enumerate(shapes) if shape[1] == "tokens"),
            rate_headers=_header_template(shapes),
        )

    def _worst_prices(self, call: Call) -> tuple[float, float]:
        """The highest input and output prices over the deployments the call
        may reach (its route; without one, every deployment its team may use)."""
        deps: tuple[Deployment, ...]
        if call.route is not None and call.route.deployments:
            deps = tuple(call.route.deployments)
        else:
            team = call.principal.team
            seen = self._team_prices.get(team)
            if seen is not None and seen[0] is call.policy:
                return seen[1]
            models = call.policy.models.values()
            deps = tuple(d for group in models for d in group if d.allows(team))
            if len(self._team_prices) > 10_000:
                self._team_prices.clear()
            self._team_prices[team] = (call.policy, _max_prices(deps))
        prices = self._prices.get(deps)
        if prices is None:
            if len(self._prices) > 10_000:
                self._prices.clear()
            prices = self._prices[deps] = _max_prices(deps)
        return prices

    def _too_many_tokens(
        self, call: Call, rule: RateLimitRule, bucket: Bucket, tokens: int
    ) -> NoReturn:
        """Refuse a call that may use more tokens than a token bucket holds when full."""
        self._count("refused", "rate")
        call.decide(self.name, "refused", reason="rate", limit=bucket.key)
        raise Refused(
            f"this call may use up to {tokens} tokens, more than the {rule.scope} limit of "
            f"{bucket.capacity} tokens per minute; lower max_tokens or split the prompt",
            type="tokens",
            code="rate_limit_exceeded",
        )

    def _refuse(
        self, call: Call, denied: Denied, plan: _Plan, takes: list[Bucket], amount: int
    ) -> NoReturn:
        if denied.kind == "budget":
            a = next(a for a in plan.applied if a.counter.key == denied.key)
            end = period_end(a.rule.period, dt.datetime.now(dt.UTC))
            when = f"; it resets at {end:%Y-%m-%dT%H:%MZ}" if end else ""
            self._count("refused", "budget")
            call.decide(self.name, "refused", reason="budget", budget=a.rule.name)
            raise Refused(
                f"the {a.rule.name} is exhausted: ${denied.committed / NANO:.4f} of "
                f"${a.rule.limit_usd:g} spent or reserved, and this call may cost up to "
                f"${amount / NANO:.4f}{when}",
                type="insufficient_quota",
                code="budget_exceeded",
                headers={"x-veil-budget-exceeded": a.rule.name},
            )
        i = next(i for i, b in enumerate(takes) if b.key == denied.key)
        (rule, kind, _), bucket = plan.shapes[i], takes[i]
        self._count("refused", "rate")
        call.decide(self.name, "refused", reason="rate", limit=denied.key)
        wait = denied.retry_after_s or 0.0
        headers = {
            f"x-ratelimit-limit-{kind}": str(bucket.capacity),
            f"x-ratelimit-remaining-{kind}": "0",
            f"x-ratelimit-reset-{kind}": _duration(wait),
        }
        per = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        raise Refused(
            f"rate limit reached for {rule.scope} {_who_label(rule, call)} on {per}: limit "
            f"{bucket.capacity}, requested {bucket.take}. Please try again in {_duration(wait)}.",
            retry_after=wait,
            type=kind,
            code="rate_limit_exceeded",
            headers=headers,
        )

    # -- response -----------------------------------------------------------------

    async def on_response(self, call: Call) -> None:
        """Settle the call's real cost (see the module doc)."""
        mine = call.scratch.get(_STATE)
        if mine is not None:
            await self._settle(call, mine, finished=True)

    async def on_error(self, call: Call, error: GatewayError) -> None:
        """Settle what the upstream already spent; release the rest."""
        mine = call.scratch.get(_STATE)
        if mine is None or mine[2]:
            return
        if call.usage is None and call.deployment is None:
            mine[2] = True
            store = self.store
            if store is not None:
                try:
                    await store.release(mine[3])
                except Exception as e:  # noqa: BLE001 - the reservation expires by itself
                    self._count("store_error", "release")
                    log.error(
                        "budget_store_failed",
                        request_id=call.id,
                        op="release",
                        error=type(e).__name__,
                    )
            call.decide(self.name, "released", reserved_usd=mine[1] / NANO, budgets=mine[4])
            return
        await self._settle(call, mine, finished=False)

    async def _settle(self, call: Call, mine: list[Any], *, finished: bool) -> None:
        mine[2] = True
        keys, amount = mine[0], mine[1]
        usage = call.usage
        counted = False
        if usage is None:
            if call.deployment is not None:
                with contextlib.suppress(Exception):  # _usage falls back to a bound then
                    await encoding_ready()  # counted below; loaded at start, normally long done
            usage, counted = _usage(call)
        dep = call.deployment
        cost = round(dep.cost(usage) * NANO) if dep is not None else 0
        model = dep.name if dep is not None else str(call.request.get("model") or "")
        principal = call.principal
        record = _new(
            Usage,
            (
                principal.team,
                principal.key_id,
                principal.user or "",
                model,
                usage.prompt_tokens,
                usage.completion_tokens,
            ),
        )
        store = self.store
        try:
            if store is None:
                raise RuntimeError("the budget store is not open")
            used = usage.prompt_tokens + usage.completion_tokens
            settle_now = getattr(store, "settle_now", None)  # one that never waits
            if settle_now is not None:
                settle_now(mine[3], cost, keys, used, record)
            else:
                await store.settle(mine[3], cost, keys, used, record)
        except Exception as e:  # noqa: BLE001 - logged loudly with the amount; never raised
            self._count("store_error", "settle")
            log.error(
                "budget_settle_failed",
                request_id=call.id,
                error=type(e).__name__,
                cost_usd=_usd(cost),
                budgets=len(keys),
            )
        spend = self._spend
        if cost and spend is not None:
            key = (principal.team, model)
            spend[key] = spend.get(key, 0) + cost
        call.decide(
            self.name,
            "settled" if finished else "settled_partial",
            usd=cost / NANO,
            reserved_usd=amount / NANO,
            budgets=mine[4],
            counted=counted,
        )

    def _count(self, what: str, label: str) -> None:
        if self.metrics is not None:
            self.metrics.count(what, label)


def _usage(call: Call) -> tuple[CallUsage, bool]:
    """The usage of a call the upstream reported none for, and whether veil
    counted it: with tiktoken (``True``), or zero for a call that never
    reached an upstream (``False``)."""
    if call.deployment is None:
        return CallUsage(), False
    streamed = call.streamed_text() if call.stream else ""
    if streamed:
        answers = [streamed]
    else:
        answers = [
            str((c.get("message") or {}).get("content") or "")
            for c in (call.response or {}).get("choices") or ()
            if isinstance(c, dict)
        ]
    question = prompt_text(call.request) if call.kind == "chat" else ""
    try:
        prompt = count_tokens(question)
        completion = sum(count_tokens(a) for a in answers)
    except Exception as e:  # noqa: BLE001 - never undercharge: bytes bound any BPE count
        log.error("budget_tokenizer_failed", request_id=call.id, error=type(e).__name__)
        prompt = text_token_bound(question)
        completion = sum(text_token_bound(a) for a in answers)
    return CallUsage(prompt, completion, prompt + completion), True


def _nanos(prompt: int, in_price: float, output: int, out_price: float) -> int:
    """Nano-dollars of tokens at prices per million (rounded up)."""
    return math.ceil((prompt * in_price + output * out_price) * (NANO / 1_000_000))


def _max_prices(deps: tuple[Deployment, ...]) -> tuple[float, float]:
    if not deps:
        return 0.0, 0.0
    return (
        max(max(d.input_per_mtok, d.cached_input_per_mtok or 0.0) for d in deps),
        max(d.output_per_mtok for d in deps),
    )


def _output_cap(call: Call, default: int) -> int:
    """The call's output cap per choice, setting the default when it has none."""
    request = call.request
    cap = 0
    for v in (request.get("max_completion_tokens"), request.get("max_tokens")):
        if type(v) is int and v > 0 and (not cap or v < cap):
            cap = v
    if not cap:
        request["max_completion_tokens"] = cap = default
    route_cap = call.route.max_output_tokens if call.route else None
    return min(cap, route_cap) if route_cap else cap


def _set_output_cap(request: dict[str, Any], cap: int) -> None:
    if isinstance(request.get("max_tokens"), int):
        request["max_tokens"] = min(request["max_tokens"], cap)
    request["max_completion_tokens"] = min(request.get("max_completion_tokens") or cap, cap)


def _header_template(
    shapes: list[tuple[RateLimitRule, str, Bucket]],
) -> tuple[tuple[str, str, str, str, str], ...] | None:
    """:attr:`_Plan.rate_headers` for these buckets (``None`` with two of one kind)."""
    kinds = [kind for _, kind, _ in shapes]
    if len(set(kinds)) != len(kinds):
        return None
    return tuple(
        (bucket.key, _HEADER_NAMES[kind][0], str(bucket.capacity), *_HEADER_NAMES[kind][1:])
        for _, kind, bucket in shapes
    )


def _rate_headers(
    headers: dict[str, str],
    buckets: list[tuple[RateLimitRule, str, Any]],
    states: dict[str, BucketState],
) -> None:
    """OpenAI's ``x-ratelimit-*`` headers, from the tightest bucket of each kind."""
    tightest: dict[str, tuple[int, BucketState]] = {}
    for _, kind, bucket in buckets:
        state = states.get(bucket.key)
        if state is None:
            continue
        current = tightest.get(kind)
        if current is None or state[0] < current[1][0]:
            tightest[kind] = (bucket.capacity, state)
    for kind, (limit, state) in tightest.items():
        _set_rate_headers(headers, kind, limit, state)


def _set_rate_headers(headers: dict[str, str], kind: str, limit: int, state: BucketState) -> None:
    limit_name, remaining_name, reset_name = _HEADER_NAMES[kind]
    remaining, reset = state
    headers[limit_name] = str(limit)
    headers[remaining_name] = str(remaining) if remaining > 0 else "0"
    headers[reset_name] = _duration(reset)


_HEADER_NAMES = {
    kind: (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind in ("requests", "tokens")
}


def _who_label(rule: RateLimitRule, call: Call) -> str:
    return call.principal.key_id if rule.scope == "key" else call.principal.team
