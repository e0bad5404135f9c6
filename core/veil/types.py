"""Shared vocabulary of the core and its plugins.

A request becomes a :class:`Call`; authentication gives its
:class:`Principal`; routing gives its :class:`RouteDecision` of
:class:`Deployment` objects; the upstream reports :class:`Usage`. Stream
chunks are plain dicts (:data:`Chunk`) in OpenAI's
``chat.completion.chunk`` shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .errors import GatewayError, UpstreamError
    from .policy.model import Policy

__all__ = [
    "AttemptCallback",
    "Call",
    "CallKind",
    "Chunk",
    "Decision",
    "Deployment",
    "Principal",
    "RouteDecision",
    "Stage",
    "Usage",
    "keep_text",
]

Chunk = dict[str, Any]
"""One parsed ``chat.completion.chunk`` object of a stream."""

CallKind = Literal["chat", "embeddings"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the API key's id, its team, its tags, and whether it is
    an admin key. ``user`` is the request's ``user`` field when given."""

    key_id: str
    team: str
    tags: frozenset[str] = frozenset()
    admin: bool = False
    user: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Deployment:
    """A concrete model behind a provider, as the policy declares it.

    ``name`` is what clients ask for; ``model`` is the upstream's own id.
    Prices are USD per million tokens. ``teams`` is ``None`` when every team
    may use it.
    """

    name: str
    provider: str
    model: str
    api_base: str | None = None
    api_key_env: str | None = None
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cached_input_per_mtok: float | None = None
    context_window: int | None = None
    teams: frozenset[str] | None = None
    timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    max_retries: int = 2
    extra: Mapping[str, Any] = field(default_factory=dict)

    def allows(self, team: str) -> bool:
        """True when ``team`` may use this deployment."""
        return self.teams is None or team in self.teams

    def cost(self, usage: Usage) -> float:
        """The USD cost of ``usage`` at this deployment's prices."""
        cached = usage.cached_tokens
        cached_price = (
            self.cached_input_per_mtok
            if self.cached_input_per_mtok is not None
            else self.input_per_mtok
        )
        return (
            (usage.prompt_tokens - cached) * self.input_per_mtok
            + cached * cached_price
            + usage.completion_tokens * self.output_per_mtok
        ) / 1_000_000


AttemptCallback = Callable[["Deployment", float, "UpstreamError | None"], None]
"""``on_attempt(deployment, seconds, error)``: see :class:`RouteDecision`."""


@dataclass(slots=True)
class RouteDecision:
    """Where a call goes: deployments to try in order (failover), an optional
    cap on output tokens, and a short reason reported in ``x-veil-route``.

    ``on_attempt``, when set (by a routing stage), is called by the core after
    every upstream attempt of the call, on the event loop, with the deployment
    tried, the seconds the attempt took and the :class:`~veil.errors.UpstreamError`
    it failed with, or ``None`` when the upstream answered (for a stream: once
    the upstream accepted it and the first chunks can flow). When the chosen
    deployment fails after that (a stream that breaks half-way, which is never
    retried), it is called once more for that attempt, with the error and the
    seconds since the call started. It must be cheap and must not raise: an
    exception it raises is logged and ignored. Routing stages use it for
    circuit breakers and latency averages.
    """

    deployments: list[Deployment]
    max_output_tokens: int | None = None
    reason: str = "policy"
    on_attempt: AttemptCallback | None = None


@dataclass(slots=True)
class Usage:
    """Token counts the upstream reported (or a stage estimated)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: Mapping[str, Any] | None) -> Usage | None:
        """Build from an OpenAI ``usage`` object; ``None`` if absent or malformed."""
        if not isinstance(usage, Mapping):
            return None
        try:
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            total = int(usage.get("total_tokens") or prompt + completion)
            details = usage.get("prompt_tokens_details")
            cached = int(details.get("cached_tokens") or 0) if isinstance(details, Mapping) else 0
        except (TypeError, ValueError):
            return None
        return cls(prompt, completion, total, cached)


_NO_DETAIL: Mapping[str, Any] = MappingProxyType({})


class Decision(NamedTuple):
    """Something a stage decided about a call, recorded for audit.

    ``detail`` holds ids, counts and types only, never request text.
    Immutable, so calls may share one made once (a named tuple: a call's
    decision costs a third of what a frozen dataclass did)."""

    stage: str
    action: str
    detail: Mapping[str, Any] = _NO_DETAIL


_new_decision = tuple.__new__


@dataclass(slots=True, eq=False)
class Call:
    """One request travelling through the gateway.

    Stages read and may change ``request`` (the parsed JSON body) in
    ``on_request``; a stage may answer the call itself by setting ``response``
    (a complete OpenAI response body; for a streaming call the core turns it
    into chunks). ``started_at`` (epoch seconds) and ``started``
    (``perf_counter``) mark the call's arrival; ``upstream_seconds`` sums the
    time spent waiting for the upstream (for streams, until the last chunk);
    ``attempts`` counts upstream attempts and ``failovers`` the moves to a
    later deployment of the route. ``route`` is preset from the policy's deployments when the
    requested model names one, and a routing stage may replace it.
    ``id`` is the client's ``x-request-id`` when it sent a well-formed one:
    not unique, so never the key of per-call state (two calls in flight may
    share it). ``scratch`` is a per-stage space: use ``call.scratch[stage_name]``.
    ``stream_text``: a stage that needs the text an upstream streamed (to
    count the tokens of a stream that ended without usage, say) sets it to
    an empty list in ``on_request``; the core then appends each chunk's
    delta ``content`` and tool-call ``arguments`` as they arrive from the
    upstream, before any stage's ``wrap_stream`` sees the chunk. Cheaper
    than a ``wrap_stream`` that only watches. ``stream_chunks``: the
    cheaper kind for a stage that only needs an estimate: set it to an empty
    list and the core appends each upstream chunk itself, by reference (no
    text taken out per chunk); later stages may change a chunk in place (the
    PII stage restores values into it), so never use it for text that must
    be exact, such as what a cache stores. :meth:`streamed_text` gives the
    text of either.
    """

    id: str
    kind: CallKind
    request: dict[str, Any]
    principal: Principal
    policy: Policy
    headers: Mapping[str, str]
    stream: bool = False
    route: RouteDecision | None = None
    deployment: Deployment | None = None
    response: dict[str, Any] | None = None
    usage: Usage | None = None
    answered_by: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    error: GatewayError | None = None
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    upstream_seconds: float = 0.0
    attempts: int = 0
    failovers: int = 0
    stream_text: list[str] | None = None
    stream_chunks: list[Chunk] | None = None

    def decide(self, stage: str, action: str, **detail: Any) -> None:
        """Record a decision for audit (ids, counts and types only)."""
        self.decisions.append(_new_decision(Decision, (stage, action, detail)))

    def streamed_text(self) -> str:
        """The text the upstream streamed so far (delta ``content`` and
        tool-call ``arguments``): from ``stream_text`` when a stage asked for
        it, else taken out of ``stream_chunks``; ``""`` when no stage asked
        for either (see the class doc)."""
        if self.stream_text is not None:
            return "".join(self.stream_text)
        if not self.stream_chunks:
            return ""
        out: list[str] = []
        for chunk in self.stream_chunks:
            keep_text(out, chunk)
        return "".join(out)


def keep_text(out: list[str], chunk: Chunk) -> None:
    """Append a stream chunk's delta text and tool-call arguments to ``out``."""
    choices = chunk.get("choices")
    if not choices or type(choices) is not list:
        return
    for choice in choices:
        delta = choice.get("delta") if type(choice) is dict else None
        if not delta or type(delta) is not dict:
            continue
        text = delta.get("content")
        if text and type(text) is str:
            out.append(text)
        tools = delta.get("tool_calls")
        if tools and type(tools) is list:
            for tool in tools:
                fn = tool.get("function") if type(tool) is dict else None
                args = fn.get("arguments") if type(fn) is dict else None
                if args and type(args) is str:
                    out.append(args)


@runtime_checkable
class Stage(Protocol):
    """A step of the request path. Every method is optional: implement the
    ones you need. ``name`` is the plugin's name as the policy lists it.

    - ``async on_request(call)``: in policy order, before the upstream; may
      rewrite ``call.request``, refuse (raise a ``GatewayError``), answer
      (set ``call.response``) or annotate.
    - ``async on_response(call)``: in reverse order, after the upstream
      answered (for streams: after the last chunk); ``call.response`` holds
      the body of a non-streaming call, ``call.usage`` the usage.
    - ``wrap_stream(call, chunks) -> AsyncIterator[Chunk]``: in reverse
      order, wraps the async iterator of chunks of a streaming call.
    - ``async on_error(call, error)``: for every failure once the call
      exists, in reverse order, for every stage, whether or not its
      ``on_request`` ran: release what you hold, write what you must.
    - ``async on_finish(call)``: once the call's outcome is settled (after
      every ``on_response``, or every ``on_error`` with ``call.error`` set),
      in reverse order, before the client gets the response (for streams:
      before the final ``[DONE]``). For what must see the whole call, such
      as an audit record. On success it may still refuse the call by
      raising a ``GatewayError``; ``on_error`` and ``on_finish`` then run
      again for the failure.

    ``on_request``, ``on_response``, ``on_error`` and ``on_finish`` may also
    be plain functions (``def``) that return ``None`` when they are done, or
    an awaitable (a coroutine) that finishes the work and is awaited under
    the stage's timeout. A stage that usually does not wait (an in-memory
    cache) saves a coroutine per call this way. Like ``async def`` hooks, a
    plain one runs on the event loop and must never block it.
    """

    name: str
