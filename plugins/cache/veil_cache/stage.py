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
    """A call whose answer is to be stored."""

    key: str
    partition: str | None = None
    vector: Vector | None = None
    stream_storable: bool = False


_HIT = "hit"
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

    async def on_request(self, call: Call) -> None:
        """Answer the call from the cache, or note what to store (module doc).

        :raises BadRequest: 400 ``invalid_cache_header``: ``x-veil-cache`` holds
            anything but ``bypass``.
        """
        if call.kind != "chat":
            self._bypass(call, "kind")
            return
        headers = call.headers
        lookup = True
        wanted = headers.get(HEADER)
        if wanted is not None:
            if wanted.strip().lower() != "bypass":
                raise BadRequest(
                    f"the {HEADER} request header accepts only 'bypass'",
                    code="invalid_cache_header",
                )
            self._bypass(call, "client")
            return
        control = headers.get("cache-control")
        if control is not None:
            directives = {d.strip().lower() for d in control.split(",")}
            if "no-store" in directives:
                self._bypass(call, "client")
                return
            lookup = "no-cache" not in directives
        request = call.request
        if not self.any_temperature:
            t = request.get("temperature")
            if t != 0 or type(t) is bool:
                self._bypass(call, "temperature")
                return
        store = self.store
        if store is None:
            self._bypass(call, "not_started")
            return
        team = call.principal.team
        key = exact_key(call)
        miss = _Miss(key)
        if lookup:
            try:
                memory = self._memory
                value = (
                    memory.get_now(team, key) if memory is not None else await store.get(team, key)
                )
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
        if call.stream and _plain_stream(request):
            # the core collects the streamed text for us (cheaper than a stream wrapper)
            miss.stream_storable = True
            if call.stream_text is None:
                call.stream_text = []
        call.scratch[self.name] = miss
        call.response_headers[HEADER] = "miss"
        self._count("misses")
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

    async def on_response(self, call: Call) -> None:
        """A hit: zero upstream usage. A miss: store the (still redacted) answer."""
        mine = call.scratch.get(self.name)
        if mine is None:
            return
        if mine is _HIT:
            call.usage = Usage()
            return
        answer = _streamed_answer(call, mine) if call.stream else call.response
        if not _storable(answer):
            return
        # serialized now: pii restores the answer in place after this stage
        value = orjson.dumps(answer)
        store = self.store
        if store is None:
            return
        team = call.principal.team
        try:
            memory = self._memory
            stored = (
                memory.put_now(team, mine.key, value)
                if memory is not None
                else await store.put(team, mine.key, value)
            )
            if not stored:
                return
            if self.semantic and self.embedder is not None:
                if mine.vector is None:  # no-cache: the question was not embedded
                    text = last_user_text(call.request)
                    if text and len(text) <= self.max_chars:
                        mine.partition = partition_key(call)
                        mine.vector = await self.embedder.embed_async(text)
                if mine.vector is not None and mine.partition is not None:
                    await store.add_vector(team, mine.partition, mine.key, mine.vector)
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
        store = self.store
        if store is not None and store.shared:
            store.count(what)


def _storable(answer: dict[str, Any] | None) -> bool:
    """A complete answer: every choice finished (no error, no cut-off stream)."""
    if not isinstance(answer, dict):
        return False
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for c in choices:
        if not isinstance(c, dict) or c.get("finish_reason") not in _STORABLE_FINISH:
            return False
    return True


def _plain_stream(request: dict[str, Any]) -> bool:
    """A streamed request whose answer is one choice of plain text: what
    :func:`_streamed_answer` can rebuild from the text the core collects.
    (Tool calls, several choices, log probabilities and structured outputs
    are stored from non-streaming calls only.)"""
    n = request.get("n")
    fmt = request.get("response_format")
    return (
        not request.get("tools")
        and not request.get("functions")
        and (n is None or n == 1)
        and not request.get("logprobs")
        and not (isinstance(fmt, dict) and fmt.get("type") == "json_schema")
    )


def _streamed_answer(call: Call, miss: _Miss) -> dict[str, Any] | None:
    """The ``chat.completion`` a completed plain stream amounts to: its text
    (collected by the core in ``call.stream_text``) and usage (the upstream's
    last chunk: a stream that ended without it is not stored). The finish
    reason is ``length`` when the answer used its whole output cap, else
    ``stop``."""
    usage = call.usage
    if not miss.stream_storable or call.stream_text is None or usage is None:
        return None
    text = "".join(call.stream_text)
    if not text:
        return None
    request = call.request
    caps = [v for v in (request.get("max_completion_tokens"), request.get("max_tokens"))]
    cap = min((v for v in caps if type(v) is int and v > 0), default=0)
    if call.route is not None and call.route.max_output_tokens:
        cap = min(cap or call.route.max_output_tokens, call.route.max_output_tokens)
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
