"""veil-cache: exact and semantic answer caching that never stores personal
data and never crosses tenants.

This module holds the plugin's hook implementations; the work is done in
:mod:`veil_cache.stage` (the request-path stage), :mod:`veil_cache.keys`
(what makes two requests the same), :mod:`veil_cache.store` and
:mod:`veil_cache.redis_store` (storage), :mod:`veil_cache.embed` (the
semantic cache's model), :mod:`veil_cache.admin` (``/admin/cache``) and
:mod:`veil_cache.cli` (``veil cache``).
"""

from __future__ import annotations

from collections.abc import Callable

import click

from veil import PluginError, Stage, hookimpl
from veil.registry import RouteRegistrar
from veil.runtime import Runtime

from .settings import CacheSettings

__all__ = [
    "__version__",
    "veil_register_commands",
    "veil_register_routes",
    "veil_register_stages",
    "veil_settings_model",
    "veil_shutdown",
    "veil_startup",
]

__version__ = "0.1.0"


@hookimpl
def veil_settings_model() -> type[CacheSettings]:
    """The ``[cache]`` section is validated by :class:`CacheSettings`."""
    return CacheSettings


@hookimpl
def veil_register_stages(register: Callable[[Stage], None], settings: CacheSettings) -> None:
    """Register the ``cache`` stage for this policy's settings."""
    from .stage import CacheStage

    register(CacheStage(settings))


@hookimpl
async def veil_startup(runtime: Runtime) -> None:
    """Open the store (and load the semantic model).

    :raises PluginError: Redis without its URL or key, a key other replicas
        do not share, or the semantic model missing.
    """
    from .admin import stages

    for stage in stages(runtime):
        try:
            await stage.start()
        except Exception as e:  # noqa: BLE001 - any start-up failure names the plugin
            raise PluginError("cache", str(e)) from e


@hookimpl
async def veil_shutdown(runtime: Runtime) -> None:
    """Close the store."""
    from .admin import stages

    for stage in stages(runtime):
        await stage.close()


@hookimpl
def veil_register_routes(register: RouteRegistrar) -> None:
    """``GET`` and ``DELETE /admin/cache`` (admin keys only)."""
    from .admin import cache_endpoint

    register("/admin/cache", cache_endpoint, methods=("GET", "DELETE"), admin=True)


@hookimpl
def veil_register_commands(cli: click.Group) -> None:
    """Add ``veil cache eval | stats | clear | keygen``."""
    from .cli import cache

    cli.add_command(cache)
