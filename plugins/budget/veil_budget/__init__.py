"""veil-budget: hard budgets and rate limits that hold under concurrency and
across replicas.

This module holds the plugin's hook implementations; the work is done in
:mod:`veil_budget.stage` (the request-path stage), :mod:`veil_budget.rules`
(which budgets apply), :mod:`veil_budget.sqlite_store` and
:mod:`veil_budget.redis_store` (atomic check-and-reserve), and
:mod:`veil_budget.report` (``GET /admin/spend``, ``veil budget``).
"""

from __future__ import annotations

from collections.abc import Callable

import click

from veil import PluginError, Stage, hookimpl
from veil.registry import RouteRegistrar
from veil.runtime import Runtime

from .metrics import BudgetMetrics
from .settings import BudgetSettings
from .stage import BudgetStage

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
def veil_settings_model() -> type[BudgetSettings]:
    """The ``[budget]`` section is validated by :class:`BudgetSettings`."""
    return BudgetSettings


@hookimpl
def veil_register_stages(register: Callable[[Stage], None], settings: BudgetSettings) -> None:
    """Register the ``budget`` stage for this policy's settings."""
    register(BudgetStage(settings, fail_open=bool(getattr(register, "fail_open", False))))


def stages(runtime: Runtime) -> list[BudgetStage]:
    """The runtime's budget stages (one, when the policy runs the plugin)."""
    return [spec.stage for spec in runtime.stages if isinstance(spec.stage, BudgetStage)]


@hookimpl
async def veil_startup(runtime: Runtime) -> None:
    """Open the store.

    :raises PluginError: the store cannot be opened (its URL is missing, or
        another process owns the SQLite file).
    """
    metrics = BudgetMetrics.for_registry(runtime.metrics.registry)
    for stage in stages(runtime):
        try:
            await stage.start(metrics, runtime.state_dir)
        except Exception as e:  # noqa: BLE001 - any start-up failure names the plugin
            raise PluginError("budget", str(e)) from e


@hookimpl
async def veil_shutdown(runtime: Runtime) -> None:
    """Close the store."""
    for stage in stages(runtime):
        await stage.close()


@hookimpl
def veil_register_routes(register: RouteRegistrar) -> None:
    """``GET /admin/spend`` (admin keys only)."""
    from .report import spend_endpoint

    register("/admin/spend", spend_endpoint, methods=("GET",), admin=True)


@hookimpl
def veil_register_commands(cli: click.Group) -> None:
    """Add ``veil budget report`` and ``veil budget reset``."""
    from .cli import budget

    cli.add_command(budget)
