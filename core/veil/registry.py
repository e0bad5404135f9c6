"""What plugins register at start-up: stages, providers, routes."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import PluginError
from .types import Stage

__all__ = [
    "ProviderRegistrar",
    "RouteRegistrar",
    "RouteSpec",
    "StageRegistrar",
    "StageSpec",
]

_CORE_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/embeddings", "/v1/models", "/healthz", "/readyz", "/metrics"}
)
"""Paths the core serves; a plugin may add other ``/v1/`` routes (``/v1/feedback``)."""
_CORE_PREFIXES = (
    "/v1/models/",
    "/v1/chat/",
    "/v1/embeddings/",
    "/healthz/",
    "/readyz/",
    "/metrics/",
)

_STAGE_METHODS = ("on_request", "on_response", "wrap_stream", "on_error", "on_finish")


@dataclass(frozen=True, slots=True)
class StageSpec:
    """A registered stage with its policy-given timeout (seconds) and fail mode."""

    plugin: str
    stage: Any
    timeout: float
    fail_open: bool

    @property
    def name(self) -> str:
        return str(getattr(self.stage, "name", self.plugin))

    def method(self, name: str) -> Callable[..., Any] | None:
        return getattr(self.stage, name, None)


class StageRegistrar:
    """The ``register`` passed to ``veil_register_stages``: ``register(stage)``."""

    def __init__(self, plugin: str, timeout: float, fail_open: bool) -> None:
        self.plugin = plugin
        self.timeout = timeout
        self.fail_open = fail_open
        self.specs: list[StageSpec] = []

    def __call__(self, stage: Stage) -> None:
        if not any(callable(getattr(stage, m, None)) for m in _STAGE_METHODS):
            raise PluginError(
                self.plugin,
                f"registered stage {stage!r} has none of {', '.join(_STAGE_METHODS)}",
            )
        for m in ("on_request", "on_response", "on_error", "on_finish"):
            fn = getattr(stage, m, None)
            if fn is not None and (
                not callable(fn)
                or inspect.isgeneratorfunction(fn)
                or inspect.isasyncgenfunction(fn)
            ):
                raise PluginError(
                    self.plugin,
                    f"stage method {m} must be `async def`, or a plain `def` that returns "
                    "None or an awaitable",
                )
        ws = getattr(stage, "wrap_stream", None)
        if ws is not None and inspect.iscoroutinefunction(ws):
            raise PluginError(
                self.plugin,
                "stage method wrap_stream must return an async iterator (write it as an "
                "`async def` generator with `yield`), not be a coroutine",
            )
        self.specs.append(StageSpec(self.plugin, stage, self.timeout, self.fail_open))


class ProviderRegistrar:
    """The ``register`` passed to ``veil_register_providers``: ``register(name, factory)``."""

    def __init__(self) -> None:
        self.factories: dict[str, tuple[str, Callable[[], Any]]] = {}
        self.plugin = "veil"

    def __call__(self, name: str, factory: Callable[[], Any]) -> None:
        if name in self.factories and self.factories[name][0] != self.plugin:
            raise PluginError(
                self.plugin,
                f"provider {name!r} is already registered by {self.factories[name][0]!r}",
            )
        self.factories[name] = (self.plugin, factory)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    path: str
    endpoint: Callable[[Any], Awaitable[Any]]
    methods: tuple[str, ...]
    admin: bool
    plugin: str


class RouteRegistrar:
    """The ``register`` passed to ``veil_register_routes``:
    ``register(path, endpoint, methods=("GET",), admin=False)``. The core's own
    paths (``/v1/chat/...``, ``/v1/embeddings``, ``/v1/models...``, ``/healthz``,
    ``/readyz``, ``/metrics``) are refused; other ``/v1/`` paths are allowed."""

    def __init__(self) -> None:
        self.routes: list[RouteSpec] = []
        self.plugin = "veil"

    def __call__(
        self,
        path: str,
        endpoint: Callable[[Any], Awaitable[Any]],
        methods: Iterable[str] = ("GET",),
        admin: bool = False,
    ) -> None:
        if not path.startswith("/"):
            raise PluginError(self.plugin, f"route path {path!r} must start with '/'")
        if path in _CORE_PATHS or path.startswith(_CORE_PREFIXES):
            raise PluginError(self.plugin, f"route path {path!r} is reserved by the core")
        admin = admin or path.startswith(("/-/", "/admin/"))
        self.routes.append(RouteSpec(path, endpoint, tuple(methods), admin, self.plugin))
