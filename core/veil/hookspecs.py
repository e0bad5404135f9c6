"""The hooks a veil plugin implements. Their docstrings are the contract.

A plugin is a module (or object) registered under the entry-point group
``veil``; it implements any of these hooks with ``@veil.hookimpl``. Every hook
here is **sync only**, except :func:`veil_startup` and :func:`veil_shutdown`,
which may be ``async def`` and are awaited. An ``async def`` implementation of
a sync hook is rejected at start-up with a message naming the plugin.

The request path is not a pluggy hook: plugins register *stage* objects (see
:class:`veil.types.Stage`) with :func:`veil_register_stages`, and the core
runs them in the order the policy lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from .gateway import Runtime
    from .registry import ProviderRegistrar, RouteRegistrar, StageRegistrar

__all__ = ["SYNC_HOOKS", "hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("veil")
hookimpl = pluggy.HookimplMarker("veil")

SYNC_HOOKS = frozenset(
    {
        "veil_register_stages",
        "veil_register_providers",
        "veil_register_routes",
        "veil_register_commands",
        "veil_settings_model",
    }
)
"""Hooks the core calls synchronously; ``async def`` implementations are refused."""


@hookspec
def veil_register_stages(register: StageRegistrar, settings: Any) -> None:
    """Register the plugin's request-path stages. Sync only.

    Fires once per policy load (at start-up and on every accepted reload),
    for each plugin the policy names, with that plugin's own settings.

    :param register: call ``register(stage)`` with an object that has a
        ``name`` and any of ``on_request``, ``on_response``, ``wrap_stream``,
        ``on_error`` (see :class:`veil.types.Stage`). Stages run at the
        position the policy's ``[gateway] pipeline`` gives the plugin.
    :param settings: the plugin's policy section (``[<plugin name>]``),
        validated by the class :func:`veil_settings_model` returned, or a
        plain ``dict`` when the plugin returns none.
    """


@hookspec
def veil_register_providers(register: ProviderRegistrar) -> None:
    """Register provider adapters by name. Sync only.

    :param register: call ``register(name, factory)``; ``factory()`` returns
        an object with ``async chat(call, deployment, body) -> dict``,
        ``async chat_stream(call, deployment, body) -> AsyncIterator[Chunk]``
        (returns the chunks once the upstream accepted the request, raising
        before that so the call can fail over; a plain async generator is
        accepted too, but then cannot fail over), ``async embeddings(call, deployment, body)
        -> dict`` and ``async aclose()``. Deployments name the provider in
        their ``provider`` field.
    """


@hookspec
def veil_register_routes(register: RouteRegistrar) -> None:
    """Register extra HTTP routes (admin pages, feedback, metrics). Sync only.

    :param register: call ``register(path, endpoint, methods=("GET",),
        admin=False)``; ``endpoint`` is a Starlette endpoint
        ``async (request) -> Response``. With ``admin=True`` only admin keys
        reach it (paths under ``/-/`` and ``/admin/`` are always admin-only).
        ``request.state.principal`` holds the caller.
    """


@hookspec
def veil_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``veil`` command line. Sync only.

    Fires when the ``veil`` command runs. Unlike the gateway, the command
    line loads every installed plugin for this hook, so that
    ``veil <plugin command>`` works without a policy.

    :param cli: the root ``click.Group``; use ``@cli.command()`` or
        ``cli.add_command(...)``.
    """


@hookspec(firstresult=True)
def veil_settings_model() -> Any:
    """Return the class that validates this plugin's policy section. Sync only.

    Called for each named plugin at every policy load. Return a pydantic
    model class (validated with ``model_validate``) or any callable taking
    the section's ``dict`` and returning the settings object; raise
    ``ValueError`` for an invalid section (the policy is then refused).
    Return ``None`` (or do not implement it) to receive the raw ``dict``.
    """


@hookspec
async def veil_startup(runtime: Runtime) -> None:
    """Open pools, files and models. May be ``async def``; awaited.

    Fires once per policy load, after stages are registered and before the
    policy starts serving. Raising stops start-up (or refuses a reload).

    :param runtime: the policy-bound runtime (``runtime.policy``,
        ``runtime.stages``, ``runtime.settings[plugin]``).
    """


@hookspec
async def veil_shutdown(runtime: Runtime) -> None:
    """Close what :func:`veil_startup` opened. May be ``async def``; awaited.

    Fires when the gateway stops, and for a replaced policy once the calls
    that started under it have finished. Exceptions are logged, not raised.

    :param runtime: the runtime being retired (the same object
        :func:`veil_startup` received).
    """
