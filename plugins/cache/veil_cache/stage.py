"""The ``cache`` stage: answer repeated questions without calling the upstream.

Its place is after ``pii`` (and ``budget``) and before ``audit``::

    pipeline = ["pii", "budget", "cache", "audit"]

so that it sees the request as the upstream will (redacted: placeholders, not
values) and stores the answer before ``pii`` restores it.

``on_request`` (chat calls):

1. client control: ``x-veil-cache: bypass`` or ``Cache-Control: no-store``
   skip the cache (neither look up nor store); ``Cache-Control: no-cache``
   skips the look-up but stores the fresh answer;
2. only calls with ``temperature`` 0 are cached, unless the policy says
   ``any_temperature = true`` (a sampled answer served again is no sample);
3. look up the exact key (:func:`~veil_cache.keys.exact_key`: team, policy
   version, route and the redacted request); with ``[cache.semantic]`` on, a
   miss is looked up by meaning in the same partition;
4. a hit answers the call: the stored answer with a fresh ``id`` and
   ``created``, its original ``usage``; the call never reaches the upstream.
   For a stream the core replays it as chunks (with usage when asked).

``on_response`` of a hit sets the call's usage to zero tokens (the upstream
spent none: ``budget`` settles it at $0 and releases its reservation); of a
miss, it stores the answer. A streamed miss is stored once complete, rebuilt
from the text the core collects (``call.stream_text``: no stream wrapper, so
streams cost no extra generator per chunk) and the usage of the upstream's
last chunk, when its answer is one choice of plain text (no tools, ``n`` 1,
no log probabilities or JSON schema: those are stored from non-streaming
calls). Every answer carries ``x-veil-cache: hit|miss|bypass``, and
each call a ``cache`` decision (``hit``, ``miss``, ``stored`` or ``bypass``)
for audit. A store that fails (Redis down) never fails the call: it is served
uncached, logged and counted.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from veil import BadRequest, Call
from veil.types import Decision, Usage

from .embed import Embedder, Vector
from .keys import exact_key, last_user_text, partition_key
from .settings import CacheSettings
from .store import MemoryStore, Store

__all__ = ["CacheStage", "HEADER", "open_store"]

log = structlog.get_logger("veil.cache")

HEADER = "x-veil-cache"
"""Request header (``bypass``) and response header (``hit``, ``miss``, ``bypass``)."""
_STORABLE_FINISH = frozenset({"stop", "length", "tool_calls", "function_call"})
_NOT_PLAIN = frozenset({"tools", "functions", "n", "logprobs", "response_format"})
"""Request fields that may make a stream more than one choice of plain text."""


def open_store(settings: CacheSettings) -> Store:
    """The store the settings name.

    :raises ValueError: Redis without its URL or encryption key in the environment.
    """
    sem = settings.semantic
    if settings.store == "redis":
        from .redis_store import RedisStore
        from .seal import load_key

        url = os.environ.get(settings.redis_url_env)
        if not url:
            raise ValueError(
                f'[cache] store = "redis" needs the Redis URL in ${settings.redis_url_env}'
            )
        return RedisStore(
            url,
            load_key(settings.key_env),
            prefix=settings.prefix,
            ttl_s=settings.ttl_s,
            max_entry_bytes=settings.max_entry_bytes,
            max_per_partition=sem.max_per_partition,
        )
    return MemoryStore(
        ttl_s=settings.ttl_s,
        max_entries=settings.max_entries,
        max_bytes=settings.max_bytes,
        max_entry_bytes=settings.max_entry_bytes,
        max_per_partition=sem.max_per_partition,
    )


@dataclass(slots=True)
class _Miss:
    """A miss whose question was embedded by the semantic look-up: the answer
    is stored under ``key`` and found by ``vector`` in ``partition``. (A miss
    without a vector is noted by its key alone.)"""

    key: str
    partition: str | None = None
    vector: Vector | None = None


class _Hit:
    """The mark of a call answered from the cache (``call.scratch``)."""


_HIT = _Hit()
_NAME = "cache"
_MISSED = Decision(_NAME, "miss")
_STORED = Decision(_NAME, "stored")
"""The two decisions of every miss, made once: immutable, so calls share them."""


class CacheStage:
    """See the module doc. One per policy load; the store is opened in
    :meth:`start` (``veil_startup``)."""

    name = _NAME

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.any_temperature = settings.any_temperature
        self.semantic = settings.semantic.enabled
        self.threshold = settings.semantic.threshold
        self.max_chars = settings.semantic.max_chars
        self.store: Store | None = None
        self._memory: MemoryStore | None = None  # the store, when it never waits
        self.embedder: Embedder | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            ("hits", "semantic_hits", "misses", "stored", "bypassed", "store_errors"), 0
        )
        self._id_prefix = secrets.token_hex(6)  # a hit's id: 24 hex digits, as upstreams'
        self._ids = itertools.count()

    async def start(self, store: Store | None = None, embedder: Embedder | None = None) -> None:
        """Open the store and, with the semantic cache on, load the model (in a thread).

        :raises ValueError: the Redis URL or key is missing.
        :raises WrongKey: the Redis store's entries were sealed with another key.
        """
        if self.store is None:
            self.store = store or open_store(self.settings)
            check = getattr(self.store, "check_key", None)
            if check is not None:
                await check()
            self._memory = self.store if isinstance(self.store, MemoryStore) else None
        if self.semantic and self.embedder is None:
            self.embedder = embedder or await asyncio.to_thread(Embedder)

    async def close(self) -> None:
        """Close the store."""
        if self.store is not None:
            store, self.store = self.store, None
            self._memory = None
            await store.close()

    # -- request --------------------------------------------------------------------

    def _bypass(self, call: Call, reason: str) -> None:
        call.response_headers[HEADER] = "bypass"
        self._count("bypassed")
        call.decide(self.name, "bypass", reason=reason)

    def on_request(self, call: Call) -> Awaitable[None] | None:
        """Answer the call from the cache, or note what to store (module doc).

        A plain function: with the memory store and no semantic look-up (the
        usual case) the whole look-up is done here and ``None`` returned;
        otherwise it returns the coroutine that finishes it (the store waits).

        :raises BadRequest: 400 ``invalid_cache_header``: ``x-veil-cache`` holds
            anything but ``bypass``.
        """
        if call.kind != "chat":
            self._bypass(call, "kind")
            return None
        lookup = True
        headers = call.headers
        if HEADER in headers or "cache-control" in headers:
            control = _client_control(headers)
            if control is None:
                self._bypass(call, "client")
                return None
            lookup = control
        if not self.any_temperature:
            t = call.request.get("temperature")
            if t != 0 or type(t) is bool:
                self._bypass(call, "temperature")
                return None
        memory = self._memory
        if memory is None or (lookup and self.semantic):
            return self._look_up(call, lookup)
        key = exact_key(call)
        if lookup:
            value = memory.get_now(call.principal.team, key)
            if value is not None:
                self._hit(call, value, "exact", 1.0)
                return None
        self._missed(call, key)
        return None

    async def _look_up(self, call: Call, lookup: bool) -> None:
        """:meth:`on_request`'s look-up in a store that waits (Redis), or by
        meaning (the semantic cache)."""
        store = self.store
        if store is None:
            self._bypass(call, "not_started")
            return
        team = call.principal.team
        key = exact_key(call)
        miss = _Miss(key)
        if lookup:
            try:
                value = await store.get(team, key)
                match = "exact"
                similarity = 1.0
                if value is None and self.semantic:
                    found = await self._nearest(call, store, miss)
                    if found is not None and found[1] >= self.threshold:
                        value = await store.get(team, found[0])
                        match, similarity = "semantic", found[1]
            except Exception as e:  # noqa: BLE001 - a broken store serves the call uncached
                self._store_failed(call, "get", e)
                return
            if value is not None:
                self._hit(call, value, match, similarity)
                return
        self._missed(call, key if miss.vector is None else miss)

    def _missed(self, call: Call, miss: str | _Miss) -> None:
        """Note a miss: what ``on_response`` stores under which key (not for a
        stream whose answer cannot be rebuilt from its text), and the header,
        counter and decision."""
        if not call.stream:
            call.scratch[_NAME] = miss
        elif _plain_stream(call.request):
            # the core collects the streamed text for us (cheaper than a stream wrapper)
            call.scratch[_NAME] = miss
            if call.stream_text is None:
                call.stream_text = []
        call.response_headers[HEADER] = "miss"
        self.counters["misses"] += 1
        if self._memory is None:
            self._count_shared("misses")
        call.decisions.append(_MISSED)

    async def _nearest(self, call: Call, store: Store, miss: _Miss) -> tuple[str, float] | None:
        """Embed the last user message (off the loop) and find the closest
        question of its partition; keeps the vector on ``miss`` for storing."""
        text = last_user_text(call.request)
        if not text or len(text) > self.max_chars or self.embedder is None:
            return None
        miss.partition = partition_key(call)
        miss.vector = await self.embedder.embed_async(text)
        return await store.nearest(call.principal.team, miss.partition, miss.vector)

    def _hit(self, call: Call, value: bytes, match: str, similarity: float) -> None:
        answer = orjson.loads(value)
        # unique, shaped like an upstream's (never the client's x-request-id)
        answer["id"] = f"chatcmpl-{self._id_prefix}{next(self._ids):012x}"
        answer["created"] = int(time.time())
        call.response = answer
        call.answered_by = self.name
        call.scratch[self.name] = _HIT
        call.response_headers[HEADER] = "hit"
        self._count("hits")
        if match == "semantic":
            self._count("semantic_hits")
            call.decide(self.name, "hit", match=match, similarity=round(similarity, 4))
        else:
            call.decide(self.name, "hit", match=match)

    def _store_failed(self, call: Call, op: str, e: Exception) -> None:
        self._count("store_errors")
        log.error("cache_store_failed", request_id=call.id, op=op, error=type(e).__name__)
        if op == "get":
            self._bypass(call, "store_error")

    # -- response -------------------------------------------------------------------

    def on_response(self, call: Call) -> Awaitable[None] | None:
        """A hit: zero upstream usage. A miss: store the (still redacted) answer.

        A plain function like :meth:`on_request`: the memory store is written
        here; a store that waits, or a question still to embed, is finished by
        the coroutine it returns."""
        mine = call.scratch.get(_NAME)
        if mine is None:
            return None
        if mine is _HIT:
            call.usage = Usage()
            return None
        if call.stream:
            answer = _streamed_answer(call)
            if answer is None:
                return None
        else:
            answer = call.response
            if not _storable(answer):
                return None
        # serialized now: pii restores the answer in place after this stage
        value = orjson.dumps(answer)
        memory = self._memory
        if memory is None or self.semantic or type(mine) is not str:
            return self._store(call, mine, value)
        if memory.put_now(call.principal.team, mine, value):
            self.counters["stored"] += 1  # the memory store keeps no shared counters
            call.decisions.append(_STORED)
        return None

    async def _store(self, call: Call, mine: str | _Miss, value: bytes) -> None:
        """:meth:`on_response`'s store into a store that waits (Redis), with
        the question's vector for the semantic cache."""
        store = self.store
        if store is None:
            return
        team = call.principal.team
        miss = _Miss(mine) if isinstance(mine, str) else mine
        try:
            if not await store.put(team, miss.key, value):
                return
            if self.semantic and self.embedder is not None:
                if miss.vector is None:  # no-cache: the question was not embedded
                    text = last_user_text(call.request)
                    if text and len(text) <= self.max_chars:
                        miss.partition = partition_key(call)
                        miss.vector = await self.embedder.embed_async(text)
                if miss.vector is not None and miss.partition is not None:
                    await store.add_vector(team, miss.partition, miss.key, miss.vector)
        except Exception as e:  # noqa: BLE001 - the answer is served; only caching failed
            self._store_failed(call, "put", e)
            return
        self._count("stored")
        call.decisions.append(_STORED)

    async def stats(self) -> dict[str, Any]:
        """The store's figures and this process's counters."""
        doc: dict[str, Any] = {}
        if self.store is not None:
            doc.update(await self.store.stats())
        doc.update(self.counters)
        looked = self.counters["hits"] + self.counters["misses"]
        doc["hit_rate"] = round(self.counters["hits"] / looked, 4) if looked else 0.0
        doc["semantic"] = self.semantic
        return doc

    def _count(self, what: str) -> None:
        self.counters[what] += 1
        self._count_shared(what)

    def _count_shared(self, what: str) -> None:
        """Add to the store's shared counter, when it keeps them (Redis)."""
        store = self.store
        if store is not None and store.shared:
            store.count(what)


def _client_control(headers: Mapping[str, str]) -> bool | None:
    """What the client's cache headers ask for: ``None`` to skip the cache
    (``x-veil-cache: bypass``, ``Cache-Control: no-store``), ``False`` to
    skip the look-up but store the answer (``no-cache``), else ``True``.

    :raises BadRequest: 400 ``invalid_cache_header``: ``x-veil-cache`` holds
        anything but ``bypass``.
    """
    wanted = headers.get(HEADER)
    if wanted is not None:
        if wanted.strip().lower() != "bypass":
            raise BadRequest(
                f"the {HEADER} request header accepts only 'bypass'",
                code="invalid_cache_header",
            )
        return None
    control = headers.get("cache-control")
    if control is None:
        return True
    directives = {d.strip().lower() for d in control.split(",")}
    if "no-store" in directives:
        return None
    return "no-cache" not in directives


def _storable(answer: dict[str, Any] | None) -> bool:
    """A complete answer: every choice finished (no error, no cut-off stream)."""
    if type(answer) is not dict:
        return False
    choices = answer.get("choices")
    if type(choices) is not list or not choices:
        return False
    for c in choices:
        if type(c) is not dict or c.get("finish_reason") not in _STORABLE_FINISH:
            return False
    return True


def _plain_stream(request: dict[str, Any]) -> bool:
    """A streamed request whose answer is one choice of plain text: what
    :func:`_streamed_answer` can rebuild from the text the core collects.
    (Tool calls, several choices, log probabilities and structured outputs
    are stored from non-streaming calls only.)"""
    if _NOT_PLAIN.isdisjoint(request):  # the usual request: none of the fields
        return True
    n = request.get("n")
    fmt = request.get("response_format")
    return (
        not request.get("tools")
        and not request.get("functions")
        and (n is None or n == 1)
        and not request.get("logprobs")
        and not (isinstance(fmt, dict) and fmt.get("type") == "json_schema")
    )


def _streamed_answer(call: Call) -> dict[str, Any] | None:
    """The ``chat.completion`` a completed plain stream amounts to: its text
    (collected by the core in ``call.stream_text``) and usage (the upstream's
    last chunk: a stream that ended without it is not stored). The finish
    reason is ``length`` when the answer used its whole output cap, else
    ``stop``."""
    usage = call.usage
    if call.stream_text is None or usage is None:
        return None
    text = "".join(call.stream_text)
    if not text:
        return None
    request = call.request
    cap = 0
    for v in (request.get("max_completion_tokens"), request.get("max_tokens")):
        if type(v) is int and v > 0 and (not cap or v < cap):
            cap = v
    route = call.route
    if route is not None and route.max_output_tokens and not 0 < cap <= route.max_output_tokens:
        cap = route.max_output_tokens
    finish = "length" if cap and usage.completion_tokens >= cap else "stop"
    dep = call.deployment
    return {
        "id": "chatcmpl-" + call.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": dep.model if dep is not None else str(request.get("model") or ""),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        },
    }
