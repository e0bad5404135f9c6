"""veil-audit: a tamper-evident audit trail, cost attribution and compliance
reports for the veil gateway.

This module holds the plugin's hook implementations; the work is done in
:mod:`veil_audit.stage` (the request-path stage), :mod:`veil_audit.record`
(what a record says), :mod:`veil_audit.chain` (sealing and checking the
hash chain), :mod:`veil_audit.writer` and :mod:`veil_audit.files` (group
commit to rotated JSONL files), :mod:`veil_audit.otel` (spans),
:mod:`veil_audit.verify` and :mod:`veil_audit.report` (``veil audit``).
"""

from __future__ import annotations

from collections.abc import Callable

import click

from veil import PluginError, Stage, hookimpl
from veil.runtime import Runtime

from .metrics import AuditMetrics
from .settings import AuditSettings
from .stage import AuditStage

__all__ = [
    "__version__",
    "veil_register_commands",
    "veil_register_stages",
    "veil_settings_model",
    "veil_shutdown",
    "veil_startup",
]

__version__ = "0.1.0"


@hookimpl
def veil_settings_model() -> type[AuditSettings]:
    """The ``[audit]`` section is validated by :class:`AuditSettings`."""
    return AuditSettings


@hookimpl
def veil_register_stages(register: Callable[[Stage], None], settings: AuditSettings) -> None:
    """Register the ``audit`` stage for this policy's settings."""
    register(AuditStage(settings, fail_open=bool(getattr(register, "fail_open", False))))


def stages(runtime: Runtime) -> list[AuditStage]:
    """The runtime's audit stages (one, when the policy runs the plugin)."""
    return [spec.stage for spec in runtime.stages if isinstance(spec.stage, AuditStage)]


@hookimpl
async def veil_startup(runtime: Runtime) -> None:
    """Load the HMAC key and open the audit files.

    :raises PluginError: no key, the directory is not writable or another
        process writes it, or the ``otel`` sink lacks its SDK.
    """
    metrics = AuditMetrics.for_registry(runtime.metrics.registry)
    for stage in stages(runtime):
        try:
            await stage.start(runtime, metrics, __version__)
        except Exception as e:  # noqa: BLE001 - any start-up failure names the plugin
            await stage.close()
            raise PluginError("audit", str(e)) from e


@hookimpl
async def veil_shutdown(runtime: Runtime) -> None:
    """Drain the writer and close the files (with a closing record)."""
    for stage in stages(runtime):
        await stage.close()


@hookimpl
def veil_register_commands(cli: click.Group) -> None:
    """Add ``veil audit verify`` and ``veil audit report``."""
    from .cli import audit

    cli.add_command(audit)
