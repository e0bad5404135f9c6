"""The plugin's hook implementations (re-exported by :mod:`veil_routing`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from veil import PluginError, Stage, hookimpl
from veil.errors import PolicyError
from veil.registry import RouteRegistrar
from veil.runtime import Runtime

from .metrics import RoutingMetrics
from .settings import RouterSettings, RoutingSettings, check_against_policy
from .stage import FeedbackLike, RouterLike, RoutingStage, make_stage

__all__ = [
    "stages",
    "veil_register_commands",
    "veil_register_routes",
    "veil_register_stages",
    "veil_settings_model",
    "veil_shutdown",
    "veil_startup",
]


@hookimpl
def veil_settings_model() -> type[RoutingSettings]:
    """The ``[routing]`` section is validated by :class:`RoutingSettings`."""
    return RoutingSettings


@hookimpl
def veil_register_stages(register: Callable[[Stage], None], settings: RoutingSettings) -> None:
    """Register the ``routing`` stage for this policy's settings."""
    register(make_stage(settings))


def stages(runtime: Runtime) -> list[RoutingStage]:
    """The runtime's routing stages (one, when the policy runs the plugin)."""
    return [spec.stage for spec in runtime.stages if isinstance(spec.stage, RoutingStage)]


def artifact_path(router: RouterSettings, policy_path: Path | None) -> Path:
    """The router artifact's path: as given when absolute, else relative to
    the policy file's directory (the working directory without one)."""
    path = Path(router.artifact)
    if not path.is_absolute() and policy_path is not None:
        path = policy_path.parent / path
    return path


def load_router(router: RouterSettings, policy_path: Path | None) -> RouterLike:
    """Load the learned router the policy pins.

    :raises PluginError: the learned router is not installed, or the artifact
        is missing, unreadable or not the one whose SHA-256 the policy pins.
    """
    try:
        learned: Any = importlib.import_module("veil_routing.learned")
    except ImportError as e:
        raise PluginError(
            "routing",
            f"the policy configures [routing.router] but veil_routing.learned cannot be "
            f"imported ({e}); install the complete veil-routing distribution",
        ) from e
    path = artifact_path(router, policy_path)
    try:
        loaded: RouterLike = learned.load(path, router.sha256)
    except learned.ArtifactError as e:
        raise PluginError(
            "routing",
            f"router artifact {path} refused: {e}. The policy pins sha256 "
            f"{router.sha256[:12]}...; deploy the artifact it was signed with, or sign a "
            "policy with the new artifact's sha256 (`veil route train` prints it)",
        ) from None
    except OSError as e:
        raise PluginError("routing", f"router artifact {path} cannot be read: {e}") from None
    return loaded


def open_feedback(settings: RoutingSettings, runtime: Runtime) -> FeedbackLike:
    """The feedback store under ``<state dir>/routing``.

    :raises PluginError: no state directory, or the store cannot be opened.
    """
    if runtime.state_dir is None:
        raise PluginError(
            "routing",
            "[routing.feedback] is enabled but the gateway keeps no state directory; "
            "start it with --state-dir (VEIL_STATE_DIR)",
        )
    try:
        FeedbackStore: Any = importlib.import_module("veil_routing.feedback").FeedbackStore
    except ImportError as e:
        raise PluginError(
            "routing",
            f"[routing.feedback] is enabled but veil_routing.feedback cannot be imported ({e})",
        ) from e
    directory = Path(runtime.state_dir) / "routing"
    directory.mkdir(parents=True, exist_ok=True)
    try:
        store: FeedbackLike = FeedbackStore(directory, prior_weight=settings.feedback.prior_weight)
    except Exception as e:  # noqa: BLE001 - any failure names the plugin
        raise PluginError("routing", f"cannot open the feedback store in {directory}: {e}") from e
    return store


@hookimpl
async def veil_startup(runtime: Runtime) -> None:
    """Check the section against the policy, load the router, open the
    feedback store, bind the stage.

    :raises PluginError: naming what is wrong and how to fix it.
    """
    metrics = RoutingMetrics.for_registry(runtime.metrics.registry)
    for stage in stages(runtime):
        settings = stage.settings
        try:
            check_against_policy(settings, runtime.policy)
        except PolicyError as e:
            raise PluginError("routing", str(e)) from None
        router = load_router(settings.router, runtime.policy_path) if settings.router else None
        feedback = open_feedback(settings, runtime) if settings.feedback.enabled else None
        try:
            stage.start(runtime.policy, metrics, router, feedback)
        except ValueError as e:
            if feedback is not None:
                feedback.close()
            raise PluginError("routing", str(e)) from None


@hookimpl
async def veil_shutdown(runtime: Runtime) -> None:
    """Close the feedback store."""
    for stage in stages(runtime):
        if stage.feedback is not None:
            stage.feedback.close()
            stage.feedback = None


@hookimpl
def veil_register_routes(register: RouteRegistrar) -> None:
    """``POST /v1/feedback`` (any API key; scores its own calls) and
    ``GET /admin/routing`` (admin keys: breakers, latency averages, in flight)."""
    from .admin_route import state_endpoint
    from .feedback_route import feedback_endpoint

    register("/v1/feedback", feedback_endpoint, methods=("POST",))
    register("/admin/routing", state_endpoint, methods=("GET",), admin=True)


@hookimpl
def veil_register_commands(cli: click.Group) -> None:
    """Add ``veil route`` (``train``, ``eval``)."""
    try:
        route = importlib.import_module("veil_routing.route_cli").route
    except ImportError as e:
        reason = str(e)

        @click.group(name="route", invoke_without_command=True)
        def missing(**_: Any) -> None:
            """Train and evaluate learned routers (not available in this build)."""
            raise click.ClickException(
                f"`veil route` needs veil_routing.route_cli, which cannot be imported "
                f"({reason}); install the complete veil-routing distribution"
            )

        cli.add_command(missing)
        return
    cli.add_command(route)
