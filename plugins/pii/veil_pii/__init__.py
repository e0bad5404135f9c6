"""veil-pii: personal data never leaves in clear, and comes back in the answer.

This module holds the plugin's hook implementations; the work is done in
:mod:`veil_pii.stage` (the request-path stage), :mod:`veil_pii.detector`
(Presidio, configured), :mod:`veil_pii.restore` (placeholders back into
answers and streams) and :mod:`veil_pii.vault` (conversation mappings).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import click

from veil import PluginError, Stage, hookimpl
from veil.runtime import Runtime

# Presidio logs, on the gateway's stderr and as plain text, the device it runs
# on (when imported), each recognizer it loads (INFO) and each one it skips for
# another language (WARNING): before it is imported, keep its errors only.
logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)

from .settings import PiiSettings  # noqa: E402 - after the log level above
from .stage import PiiStage  # noqa: E402

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
def veil_settings_model() -> type[PiiSettings]:
    """The ``[pii]`` section is validated by :class:`PiiSettings`."""
    return PiiSettings


_FAIL_OPEN = (
    'must fail closed: remove fail = "open" from [plugins.pii]; a privacy step that '
    "cannot run refuses the call"
)


@hookimpl
def veil_register_stages(register: Callable[[Stage], None], settings: PiiSettings) -> None:
    """Register the ``pii`` stage for this policy's settings.

    :raises PluginError: the policy lets the stage fail open.
    """
    if getattr(register, "fail_open", False):
        raise PluginError("pii", _FAIL_OPEN)
    register(PiiStage(settings))


def _stages(runtime: Runtime) -> list[tuple[PiiStage, bool]]:
    return [
        (spec.stage, spec.fail_open) for spec in runtime.stages if isinstance(spec.stage, PiiStage)
    ]


@hookimpl
async def veil_startup(runtime: Runtime) -> None:
    """Load the detectors and open the conversation vault.

    :raises PluginError: the policy runs ``pii`` with ``fail = "open"``
        (a failing privacy step must refuse calls, never skip), or the vault
        cannot be configured.
    """
    for stage, fail_open in _stages(runtime):
        if fail_open:
            raise PluginError("pii", _FAIL_OPEN)
        try:
            await stage.start()
        except ValueError as e:
            raise PluginError("pii", str(e)) from e


@hookimpl
async def veil_shutdown(runtime: Runtime) -> None:
    """Close the vault and stop the analysis threads."""
    for stage, _ in _stages(runtime):
        await stage.close()


@hookimpl
def veil_register_commands(cli: click.Group) -> None:
    """Add ``veil pii eval`` and ``veil pii check``."""
    from .cli import pii

    cli.add_command(pii)
