"""A policy in force: its plugins, stages, providers and routes, and the
execution of calls under it.

One :class:`Runtime` exists per accepted policy. A call captures the runtime
current when it arrived and finishes under it, even if a new policy is swapped
in meanwhile; a replaced runtime is closed once its last call is done.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import random
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError
from starlette.routing import compile_path

from .errors import (
    AuthenticationFailed,
    GatewayError,
    NotFound,
    PluginError,
    PolicyError,
    UpstreamError,
)
from .metrics import Metrics
from .normalize import completion_to_chunks, normalize_chunk, normalize_completion
from .pipeline import Pipeline
from .plugins import PluginHost
from .policy.model import Policy
from .registry import ProviderRegistrar, RouteRegistrar, RouteSpec, StageRegistrar, StageSpec
from .types import Call, CallKind, Chunk, Deployment, Principal, RouteDecision, Usage, keep_text

__all__ = ["Runtime"]

log = structlog.get_logger("veil.runtime")


class Runtime:
    """Everything bound to one verified policy. Build with :meth:`build`,
    then ``await start()``; ``await close()`` when retired."""

    def __init__(
        self,
        policy: Policy,
        host: PluginHost,
        settings: dict[str, Any],
        pipeline: Pipeline,
        providers: dict[str, Any],
        routes: list[tuple[Any, RouteSpec]],
        metrics: Metrics,
        *,
        state_dir: Path | None = None,
        policy_path: Path | None = None,
    ) -> None:
        self.policy = policy
        self.state_dir = state_dir
        """The gateway's state directory (``--state-dir``), ``None`` when it keeps
        no state on disk; plugins keep what must outlive a restart under it."""
        self.policy_path = policy_path
        """The policy file this runtime was loaded from (``None`` when built
        from a policy that has none); files a policy names are relative to it."""
        self.host = host
        self.settings = settings
        self.pipeline = pipeline
        self.stages = pipeline.stages
        self.providers = providers
        self.routes = routes
        self.metrics = metrics
        self.inflight = 0
        self.retired = False
        self.started = False
        self._drained = asyncio.Event()
        self.expires_ts = policy.expires_at.timestamp()
        self.max_body = policy.gateway.max_body_bytes
        self._backoff = policy.gateway.retry_backoff_ms / 1000
        self._max_retry_after = policy.gateway.max_retry_after_s

    # -- assembly ---------------------------------------------------------------

    @classmethod
    def build(
        cls,
        policy: Policy,
        metrics: Metrics,
        extra_plugins: Mapping[str, Any] | None = None,
        *,
        state_dir: Path | None = None,
        policy_path: Path | None = None,
    ) -> Runtime:
        """Load the policy's plugins and collect what they register.
        ``state_dir`` and ``policy_path`` are handed to plugins as
        ``runtime.state_dir`` and ``runtime.policy_path``.

        :raises PluginError: a plugin is missing, broken or misbehaves.
        :raises PolicyError: a plugin's section is invalid.
        """
        host = PluginHost(policy, extra_plugins)
        settings: dict[str, Any] = {}
        for name in policy.plugins:
            settings[name] = _settings(host, name, policy.sections.get(name, {}))
        specs: list[StageSpec] = []
        default_timeout = policy.gateway.default_stage_timeout_ms
        for name in policy.plugins:
            entry = policy.plugin_entry(name)
            reg = StageRegistrar(
                name, (entry.timeout_ms or default_timeout) / 1000, entry.fail == "open"
            )
            host.call(name, "veil_register_stages", register=reg, settings=settings[name])
            if reg.specs and name not in policy.gateway.pipeline:
                raise PolicyError(
                    f"plugin {name!r} registers request stages but is not in [gateway] "
                    "pipeline; add it there, at the position it must run"
                )
            specs.extend(reg.specs)
        providers_reg = ProviderRegistrar()
        routes_reg = RouteRegistrar()
        for name in host.names:
            providers_reg.plugin = routes_reg.plugin = name
            host.call(name, "veil_register_providers", register=providers_reg)
            host.call(name, "veil_register_routes", register=routes_reg)
        providers: dict[str, Any] = {}
        for dep in policy.deployments:
            if dep.provider not in providers_reg.factories:
                raise PolicyError(
                    f"deployment {dep.name!r} uses provider {dep.provider!r}, which no loaded "
                    f"plugin provides (known: {', '.join(sorted(providers_reg.factories))})"
                )
            if dep.provider not in providers:
                plugin, factory = providers_reg.factories[dep.provider]
                try:
                    providers[dep.provider] = factory()
                except Exception as e:
                    raise PluginError(plugin, f"provider {dep.provider!r} failed: {e}") from e
        routes = [(compile_path(r.path)[0], r) for r in routes_reg.routes]
        return cls(
            policy,
            host,
            settings,
            Pipeline(specs),
            providers,
            routes,
            metrics,
            state_dir=state_dir,
            policy_path=policy_path,
        )

    async def start(self) -> None:
        """Run every plugin's ``veil_startup``; on failure, close what started."""
        try:
            await self.host.call_async("veil_startup", runtime=self)
        except PluginError:
            await self.close()
            raise
        self.started = True

    async def close(self) -> None:
        """Run ``veil_shutdown`` (reverse order) and close provider pools."""
        try:
            await self.host.call_async("veil_shutdown", reverse=True, runtime=self)
        except PluginError as e:
            log.error("plugin_shutdown_failed", plugin=e.plugin, error=str(e))
        for p in self.providers.values():
            try:
                await p.aclose()
            except Exception as e:  # pragma: no cover - best effort
                log.error("provider_close_failed", error=type(e).__name__)

    # -- call lifecycle -----------------------------------------------------------

    def acquire(self) -> None:
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1
        if self.retired and self.inflight == 0:
            self._drained.set()

    async def drained(self) -> None:
        """Wait until no call runs under this runtime any more."""
        self.retired = True
        if self.inflight > 0:
            await self._drained.wait()

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """Turn the bearer key (or ``api-key`` header) into a :class:`Principal`.

        :raises AuthenticationFailed: no key, or a key the policy does not know.
        """
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer":
                key = ""
        else:
            key = headers.get("api-key") or ""
        key = key.strip()
        if not key:
            raise AuthenticationFailed(
                "No API key provided. Send it as 'Authorization: Bearer sk-veil-...'.",
                code="missing_api_key",
            )
        principal = self.policy.keys.get(hashlib.sha256(key.encode()).hexdigest())
        if principal is None:
            raise AuthenticationFailed(
                "Incorrect API key provided. Ask your gateway admin for a key (`veil key new`).",
            )
        return principal

    def new_call(
        self,
        request_id: str,
        kind: CallKind,
        body: dict[str, Any],
        principal: Principal,
        headers: Mapping[str, str],
    ) -> Call:
        """A :class:`Call` with the policy's default route for its model."""
        if time.time() >= self.expires_ts:
            raise GatewayError(
                "The gateway's policy has expired; it refuses calls until a renewed, signed "
                "policy is deployed.",
                status=503,
                type="server_error",
                code="policy_expired",
            )
        user = body.get("user")
        if isinstance(user, str) and user:
            principal = Principal(
                principal.key_id, principal.team, principal.tags, principal.admin, user
            )
        deps = self.policy.models.get(body["model"])
        route = None
        if deps is not None:
            allowed = [d for d in deps if d.allows(principal.team)]
            route = RouteDecision(allowed) if allowed else None
        return Call(
            id=request_id,
            kind=kind,
            request=body,
            principal=principal,
            policy=self.policy,
            headers=headers,
            stream=kind == "chat" and body.get("stream") is True,
            route=route,
        )

    async def fail(self, call: Call, error: GatewayError) -> None:
        """Record ``error`` on the call and run every stage's ``on_error``."""
        if call.error is None:
            call.error = error
            dep, route = call.deployment, call.route
            if (
                isinstance(error, UpstreamError)
                and dep is not None
                and error.deployment == dep.name
                and route is not None
                and route.on_attempt is not None
            ):
                # the deployment answered, then failed (a stream that broke half-way):
                # the attempt it was reported as is a failure after all
                _report_attempt(call, route, dep, time.perf_counter() - call.started, error)
            await self.pipeline.run_error(call, error)
            if self.pipeline.finish:
                await self.pipeline.run_finish(call, failed=True)

    async def complete(self, call: Call) -> dict[str, Any]:
        """Run a non-streaming call end to end; return the response body.

        :raises GatewayError: after ``on_error`` ran for every stage.
        """
        try:
            await self.pipeline.run_request(call)
            if call.response is None:
                if call.kind == "chat":
                    body = await self._forward(call, "chat")
                    call.response = normalize_completion(body)
                else:
                    call.response = await self._forward(call, "embeddings")
                call.usage = Usage.from_openai(call.response.get("usage"))
            await self.pipeline.run_response(call)
            if self.pipeline.finish:
                await self.pipeline.run_finish(call, failed=False)
            return call.response
        except GatewayError as e:
            await self.fail(call, e)
            raise

    async def open_stream(self, call: Call) -> AsyncIterator[Chunk]:
        """Run the request stages and start the upstream stream.

        Returns the chunks the client must see (stage-wrapped, normalized).
        Errors before the upstream accepted the request are raised here
        (after ``on_error``), so the client gets a plain JSON error.
        """
        opts = call.request.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        try:
            await self.pipeline.run_request(call)
            if call.response is not None:
                chunks = _replay(completion_to_chunks(call.response, True))
            else:
                chunks = await self._forward(call, "stream")
        except GatewayError as e:
            await self.fail(call, e)
            raise
        if not self.pipeline.stream:
            return _observe(call, chunks, True, include_usage)
        chunks = self.pipeline.wrap_stream(call, _observe(call, chunks, False))
        return _for_client(chunks, include_usage)

    async def finish_stream(self, call: Call) -> None:
        """After the last chunk: run ``on_response`` in reverse order, then
        ``on_finish`` (before the stream's final ``[DONE]`` is sent)."""
        try:
            await self.pipeline.run_response(call)
            if self.pipeline.finish:
                await self.pipeline.run_finish(call, failed=False)
        except GatewayError as e:
            await self.fail(call, e)
            raise

    # -- upstream -------------------------------------------------------------------

    def _body_for(self, call: Call, model: str, op: str) -> dict[str, Any]:
        body = dict(call.request)
        body["model"] = model
        if op == "stream":
            opts = body.get("stream_options")
            body["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
        cap = call.route.max_output_tokens if call.route else None
        if cap:
            for key in ("max_completion_tokens", "max_tokens"):
                v = body.get(key)
                if isinstance(v, int) and v > cap:
                    body[key] = cap
            if "max_completion_tokens" not in body and "max_tokens" not in body:
                body["max_tokens"] = cap
        return body

    async def _forward(self, call: Call, op: str) -> Any:
        """Send the call along its route: retries with jittered backoff on the
        same deployment for retryable failures, then failover to the next.
        A stream is never retried once it has been handed out."""
        route = call.route
        if route is None or not route.deployments:
            raise NotFound.model(call.request.get("model"))
        last: UpstreamError | None = None
        for index, dep in enumerate(route.deployments):
            if index:
                call.failovers += 1
            provider = self.providers[dep.provider]
            body = self._body_for(call, dep.model, op)
            for attempt in range(dep.max_retries + 1):
                call.attempts += 1
                t0 = time.perf_counter()
                try:
                    if op == "chat":
                        result = await provider.chat(call, dep, body)
                    elif op == "stream":
                        result = provider.chat_stream(call, dep, body)
                        if inspect.isawaitable(result):  # async def returning the chunks
                            result = await result
                    else:
                        result = await provider.embeddings(call, dep, body)
                except UpstreamError as e:
                    spent = time.perf_counter() - t0
                    call.upstream_seconds += spent
                    self.metrics.upstream_errors.labels(dep.name, e.code or "error").inc()
                    if route.on_attempt is not None:
                        _report_attempt(call, route, dep, spent, e)
                    last = e
                    if not e.retryable or attempt >= dep.max_retries:
                        break
                    delay = self._retry_delay(attempt, e.retry_after)
                    if delay is None:
                        break
                    await asyncio.sleep(delay)
                    continue
                spent = time.perf_counter() - t0
                call.upstream_seconds += spent
                if route.on_attempt is not None:
                    _report_attempt(call, route, dep, spent, None)
                call.deployment = dep
                if len(route.deployments) > 1 or call.attempts > 1:
                    call.decide("core", "routed", deployment=dep.name, attempts=call.attempts)
                return result
            assert last is not None
            if not last.failover:
                break
            log.warning(
                "upstream_failover",
                request_id=call.id,
                deployment=dep.name,
                error=last.code,
            )
        assert last is not None
        raise last

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Full-jitter exponential backoff; honours ``Retry-After`` up to the
        policy's cap (beyond it: fail over instead of waiting)."""
        if retry_after is not None:
            return retry_after if retry_after <= self._max_retry_after else None
        return random.uniform(0, self._backoff * (2**attempt))

    def match_route(self, path: str) -> tuple[RouteSpec, dict[str, Any]] | None:
        """The plugin route for ``path``, with its path parameters."""
        for regex, spec in self.routes:
            m = regex.match(path)
            if m:
                return spec, m.groupdict()
        return None


def _report_attempt(
    call: Call, route: RouteDecision, dep: Deployment, spent: float, error: UpstreamError | None
) -> None:
    """Tell the route's ``on_attempt`` callback how an attempt went; a
    callback that raises is logged and ignored (the call goes on)."""
    assert route.on_attempt is not None
    try:
        route.on_attempt(dep, spent, error)
    except Exception as e:
        log.error("route_on_attempt_failed", request_id=call.id, error=type(e).__name__)


def _settings(host: PluginHost, name: str, raw: Any) -> Any:
    """Validate a plugin's policy section with the class it declares."""
    result = host.call(name, "veil_settings_model")
    model = result[0] if result else None
    if model is None:
        return raw
    try:
        if hasattr(model, "model_validate"):
            return model.model_validate(raw)
        return model(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5]
        )
        raise PolicyError(f"section [{name}] is invalid: {problems}") from None
    except (ValueError, TypeError) as e:
        raise PolicyError(f"section [{name}] is invalid: {e}") from None


async def _replay(chunks: Any) -> AsyncIterator[Chunk]:
    for c in chunks:
        yield c


async def _observe(
    call: Call, chunks: AsyncIterator[Chunk], client: bool, include_usage: bool = True
) -> AsyncIterator[Chunk]:
    """Note usage and keep the text (``call.stream_text``) or the chunks
    (``call.stream_chunks``) a stage asked for, as the chunks pass; close the
    upstream when done or abandoned. The time the stream flowed counts as
    upstream time. With ``client`` (pipelines without stream wrappers) it is
    :func:`_for_client` too: one generator less per chunk."""
    t0 = time.perf_counter()
    text, kept = call.stream_text, call.stream_chunks
    try:
        async for chunk in chunks:
            if text is not None:
                # keep_text's usual case (one choice, no tool calls) inline: calling it
                # for every chunk cost more than its work (37,000 instructions a stream)
                choices = chunk.get("choices")
                if (
                    type(choices) is list
                    and len(choices) == 1
                    and type(choice := choices[0]) is dict
                    and type(delta := choice.get("delta")) is dict
                    and "tool_calls" not in delta
                ):
                    content = delta.get("content")
                    if content and type(content) is str:
                        text.append(content)
                else:
                    keep_text(text, chunk)
            elif kept is not None:
                kept.append(chunk)
            usage = chunk.get("usage")
            if usage:
                call.usage = Usage.from_openai(usage)
                if client and not include_usage and not chunk.get("choices"):
                    continue
            yield normalize_chunk(chunk, include_usage) if client else chunk
    finally:
        call.upstream_seconds += time.perf_counter() - t0
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def _for_client(chunks: AsyncIterator[Chunk], include_usage: bool) -> AsyncIterator[Chunk]:
    """Normalize chunks and drop the usage chunk the client did not ask for."""
    try:
        async for chunk in chunks:
            if not include_usage and not chunk.get("choices") and chunk.get("usage"):
                continue
            yield normalize_chunk(chunk, include_usage)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
