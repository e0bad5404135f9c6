"""``GET /admin/cache`` (figures) and ``DELETE /admin/cache[?team=ID]`` (empty
it, for one team or all): admin keys only (the core checks them)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from veil import BadRequest
from veil.errors import NotFound
from veil.runtime import Runtime

from .stage import CacheStage

__all__ = ["cache_endpoint", "stages"]


def stages(runtime: Runtime) -> list[CacheStage]:
    """The runtime's cache stages (one, when the policy runs the plugin)."""
    return [spec.stage for spec in runtime.stages if isinstance(spec.stage, CacheStage)]


async def cache_endpoint(request: Request) -> JSONResponse:
    """GET: the store's entries (and bytes), hits, misses, stored, bypassed.
    DELETE: ``{"deleted": n, "team": id|null}``.

    :raises BadRequest: 400 for an empty ``team``.
    :raises NotFound: the policy does not run the cache stage.
    """
    found = stages(request.state.runtime)
    if not found:
        raise NotFound("the policy in force does not run the cache stage", code="cache_not_enabled")
    stage = found[0]
    if request.method == "GET":
        return JSONResponse(await stage.stats())
    team = request.query_params.get("team")
    if team is not None and not team.strip():
        raise BadRequest("team must be a team id; leave it out to clear every team", param="team")
    store = stage.store
    deleted = await store.clear(team) if store is not None else 0
    return JSONResponse({"deleted": deleted, "team": team})
