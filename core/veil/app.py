"""The HTTP application: OpenAI-compatible routes, health, metrics, admin.

``create_app(config)`` builds the ASGI app (raw ASGI for the hot endpoints,
Starlette for the rest) whose lifespan loads the signed
policy (refusing to start without a valid one) and closes everything on exit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .asgi import VeilASGI
from .errors import (
    AuthenticationFailed,
    GatewayError,
    NotFound,
    PermissionDenied,
)
from .gateway import Gateway, GatewayConfig
from .http import NOT_READY, error_response, json_response, log_internal_error, request_id
from .plugins import installed_plugins
from .runtime import Runtime
from .types import Principal

__all__ = ["create_app"]


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def _internal(rid: str, exc: BaseException) -> Response:
    log_internal_error(rid, exc)
    return error_response(
        GatewayError(f"The gateway failed to handle the request; request id {rid}."), rid
    )


def _model_entry(name: str, deps: list[Any], created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": str(deps[0].extra.get("owned_by") or deps[0].provider),
    }


def _json_endpoint(
    *, admin: bool
) -> Callable[[Callable[[Request, Runtime, Principal], Any]], Callable[[Request], Any]]:
    """Wrap a handler ``(request, runtime, principal) -> body`` with what every
    JSON route does: a request id, 503 without a policy, authentication (an
    admin key when ``admin``), and OpenAI-shaped errors."""

    def wrap(handler: Callable[[Request, Runtime, Principal], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            rid = request_id(request.headers)
            rt = _gateway(request).runtime
            try:
                if rt is None:
                    raise NOT_READY
                principal = _admin(rt, request) if admin else rt.authenticate(request.headers)
                body = handler(request, rt, principal)
            except GatewayError as e:
                return error_response(e, rid)
            return json_response(body, headers={"x-request-id": rid})

        return endpoint

    return wrap


@_json_endpoint(admin=False)
def list_models(request: Request, rt: Runtime, principal: Principal) -> dict[str, Any]:
    created = int(rt.policy.issued_at.timestamp())
    data = [
        _model_entry(name, allowed, created)
        for name, deps in rt.policy.models.items()
        if (allowed := [d for d in deps if d.allows(principal.team)])
    ]
    return {"object": "list", "data": data}


@_json_endpoint(admin=False)
def get_model(request: Request, rt: Runtime, principal: Principal) -> dict[str, Any]:
    name = request.path_params["model"]
    allowed = [d for d in rt.policy.models.get(name, []) if d.allows(principal.team)]
    if not allowed:
        raise NotFound.model(name)
    return _model_entry(name, allowed, int(rt.policy.issued_at.timestamp()))


def _rid(request: Request) -> dict[str, str]:
    return {"x-request-id": request_id(request.headers)}


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"}, headers=_rid(request))


async def readyz(request: Request) -> Response:
    rt = _gateway(request).runtime
    if rt is None or not rt.started:
        return json_response(
            {"status": "not ready", "reason": "no policy in force"}, 503, _rid(request)
        )
    if time.time() >= rt.expires_ts:
        return json_response(
            {"status": "not ready", "reason": "policy expired"}, 503, _rid(request)
        )
    return json_response(
        {
            "status": "ready",
            "policy_version": rt.policy.version,
            "plugins": list(rt.policy.plugins),
        },
        headers=_rid(request),
    )


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(
        _gateway(request).metrics.render(), media_type=CONTENT_TYPE_LATEST, headers=_rid(request)
    )


def _admin(rt: Runtime, request: Request) -> Principal:
    principal = rt.authenticate(request.headers)
    if not principal.admin:
        raise PermissionDenied("This route needs an admin key (`veil key new --admin`).")
    request.state.principal = principal
    return principal


def plugin_report(rt: Runtime | None) -> list[dict[str, Any]]:
    """Installed plugins (from metadata) and which the policy activates."""
    active = set(rt.policy.plugins) if rt else set()
    versions = rt.host.versions if rt else {}
    seen = set()
    out = []
    for p in installed_plugins():
        seen.add(p.name)
        out.append(
            {
                "name": p.name,
                "distribution": p.distribution,
                "version": versions.get(p.name) or p.version,
                "active": p.name in active,
                "position": rt.policy.gateway.pipeline.index(p.name)
                if rt and p.name in rt.policy.gateway.pipeline
                else None,
            }
        )
    for name in sorted(active - seen):
        out.append(
            {
                "name": name,
                "distribution": None,
                "version": versions.get(name),
                "active": True,
                "position": rt.policy.gateway.pipeline.index(name)
                if rt and name in rt.policy.gateway.pipeline
                else None,
            }
        )
    return out


@_json_endpoint(admin=True)
def admin_plugins(request: Request, rt: Runtime, principal: Principal) -> dict[str, Any]:
    return {"object": "list", "data": plugin_report(rt)}


@_json_endpoint(admin=True)
def admin_policy(request: Request, rt: Runtime, principal: Principal) -> dict[str, Any]:
    p = rt.policy
    return {
        "version": p.version,
        "issuer": p.issuer,
        "audience": p.audience,
        "issued_at": p.issued_at.isoformat(),
        "expires_at": p.expires_at.isoformat(),
        "sha256": p.digest,
        "pipeline": list(p.gateway.pipeline),
        "plugins": list(p.plugins),
    }


async def plugin_routes(request: Request) -> Response:
    """Dispatch to routes plugins registered; OpenAI-shaped 404/405 otherwise."""
    rid = request_id(request.headers)
    rt = _gateway(request).runtime
    found = rt.match_route(request.url.path) if rt is not None else None
    try:
        if found is None and request.url.path in _CORE_PATHS:
            raise _method_not_allowed(request)
        if found is None:
            raise NotFound(
                f"Unknown route {request.method} {request.url.path}.", code="unknown_url"
            )
        spec, params = found
        if request.method not in spec.methods and not (
            request.method == "HEAD" and "GET" in spec.methods
        ):
            raise _method_not_allowed(request)
        assert rt is not None
        if spec.admin:
            _admin(rt, request)
        else:
            try:
                request.state.principal = rt.authenticate(request.headers)
            except AuthenticationFailed:
                request.state.principal = None
        request.scope["path_params"] = params
        request.state.runtime = rt
        response: Response = await spec.endpoint(request)
        response.headers.setdefault("x-request-id", rid)
        return response
    except GatewayError as e:
        return error_response(e, rid)
    except Exception as e:
        return _internal(rid, e)


def _method_not_allowed(request: Request) -> GatewayError:
    return GatewayError(
        f"Method {request.method} is not allowed on {request.url.path}.",
        status=405,
        type="invalid_request_error",
        code="method_not_allowed",
    )


_CORE_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/embeddings", "/v1/models", "/healthz", "/readyz", "/metrics"}
)


async def _server_error(request: Request, exc: Exception) -> Response:
    return _internal(request_id(request.headers), exc)


def create_app(config: GatewayConfig) -> VeilASGI:
    """The gateway as an ASGI app: the hot endpoints in raw ASGI, the rest in
    Starlette; ``app.state.gateway`` is the :class:`Gateway`. Its lifespan
    verifies and loads the policy (start-up fails if the policy is refused)
    and closes everything on exit."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway = Gateway(config)
        app.state.gateway = gateway
        app.state.start_error = None
        try:
            await gateway.start()
        except Exception as e:  # the server stops; `veil serve` maps it to an exit code
            app.state.start_error = e
            raise
        try:
            yield
        finally:
            await gateway.stop()

    all_methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/-/plugins", admin_plugins, methods=["GET"]),
        Route("/-/policy", admin_policy, methods=["GET"]),
        Route("/{path:path}", plugin_routes, methods=all_methods),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={Exception: _server_error})
    return VeilASGI(app)


def app_from_env() -> VeilASGI:
    """App factory for ``uvicorn --factory`` and multi-worker serving: the
    configuration comes from ``VEIL_*`` environment variables."""
    return create_app(GatewayConfig.from_env())
