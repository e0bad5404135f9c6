"""Loading the plugins a verified policy names, and calling their hooks.

Plugins come only from the entry-point group ``veil`` (or, in tests, from an
explicit mapping), and only when the policy names them; an installed plugin
the policy does not name is never imported. A named plugin that is missing,
fails to import, has the wrong version or comes from another distribution than
the policy says stops start-up (or refuses a reload) with a message naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from . import hookspecs
from .errors import PluginError
from .policy.model import Policy

__all__ = ["ENTRY_POINT_GROUP", "InstalledPlugin", "PluginHost", "installed_plugins"]

ENTRY_POINT_GROUP = "veil"
CORE_PLUGIN = "veil"


@dataclass(frozen=True, slots=True)
class InstalledPlugin:
    """An entry point of group ``veil``, described without importing it."""

    name: str
    distribution: str | None
    version: str | None
    value: str


def _entry_points() -> list[EntryPoint]:
    return list(entry_points(group=ENTRY_POINT_GROUP))


def installed_plugins() -> list[InstalledPlugin]:
    """Every installed plugin, from package metadata only (nothing is imported)."""
    out = []
    for ep in _entry_points():
        dist = ep.dist
        out.append(
            InstalledPlugin(
                ep.name,
                dist.metadata["Name"] if dist is not None else None,
                dist.version if dist is not None else None,
                ep.value,
            )
        )
    return sorted(out, key=lambda p: p.name)


class PluginHost:
    """One pluggy plugin manager per policy load, with the core's own
    built-in plugin registered first and then each named plugin.

    :param extra_plugins: name -> plugin object, used instead of entry points
        for those names (tests; an embedding application). They are still
        loaded only when the policy names them.
    """

    def __init__(self, policy: Policy, extra_plugins: Mapping[str, Any] | None = None) -> None:
        self.policy = policy
        self.pm = pluggy.PluginManager("veil")
        self.pm.add_hookspecs(hookspecs)
        self.versions: dict[str, str | None] = {}
        self.distributions: dict[str, str | None] = {}
        from . import builtin

        self._register(CORE_PLUGIN, builtin)
        extra = dict(extra_plugins or {})
        eps: dict[str, list[EntryPoint]] = {}
        if any(n not in extra for n in policy.plugins):
            for ep in _entry_points():
                eps.setdefault(ep.name, []).append(ep)
        for name in policy.plugins:
            if name == CORE_PLUGIN:
                raise PluginError(name, "is the core's own name; a plugin cannot use it")
            if name in extra:
                obj = extra[name]
                version = getattr(obj, "__version__", None)
                self._check_version(name, version)
                self.versions[name], self.distributions[name] = version, None
            else:
                obj = self._load_entry_point(name, eps.get(name, []))
            self._register(name, obj)

    def _load_entry_point(self, name: str, candidates: list[EntryPoint]) -> Any:
        entry = self.policy.plugin_entry(name)
        if entry.distribution:
            want = canonicalize_name(entry.distribution)
            candidates = [
                ep
                for ep in candidates
                if ep.dist is not None and canonicalize_name(ep.dist.metadata["Name"]) == want
            ]
        if not candidates:
            where = f" from distribution {entry.distribution!r}" if entry.distribution else ""
            raise PluginError(
                name,
                f"is named by the policy but not installed{where} (no entry point {name!r} in "
                f"group {ENTRY_POINT_GROUP!r}); install it, e.g. `pip install "
                f"{entry.distribution or 'veil-' + name}`",
            )
        if len(candidates) > 1:
            dists = sorted(str(ep.dist.metadata["Name"]) for ep in candidates if ep.dist)
            raise PluginError(
                name,
                f"is provided by several distributions ({', '.join(dists)}); say which in "
                f'[plugins.{name}] distribution = "..."',
            )
        ep = candidates[0]
        version = ep.dist.version if ep.dist is not None else None
        self._check_version(name, version)
        try:
            obj = ep.load()
        except Exception as e:
            raise PluginError(name, f"failed to import ({type(e).__name__}: {e})") from e
        self.versions[name] = version
        self.distributions[name] = ep.dist.metadata["Name"] if ep.dist is not None else None
        return obj

    def _check_version(self, name: str, version: str | None) -> None:
        wanted = self.policy.plugin_entry(name).version
        if not wanted:
            return
        try:
            ok = version is not None and Version(version) in SpecifierSet(wanted)
        except InvalidVersion:
            ok = False
        if not ok:
            raise PluginError(
                name,
                f"version {version or 'unknown'} is installed, but the policy requires {wanted}",
            )

    def _register(self, name: str, obj: Any) -> None:
        try:
            hash(obj)
        except TypeError:
            raise PluginError(
                name, "must be hashable (a module or a class instance) to be registered"
            ) from None
        try:
            self.pm.register(obj, name=name)
        except (ValueError, pluggy.PluginValidationError) as e:
            raise PluginError(name, f"cannot be registered: {e}") from e
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise PluginError(name, f"implements an unknown hook: {e}") from e
        for impl_name in hookspecs.SYNC_HOOKS:
            hook = getattr(self.pm.hook, impl_name)
            for impl in hook.get_hookimpls():
                if impl.plugin_name == name and (
                    inspect.iscoroutinefunction(impl.function)
                    or inspect.isasyncgenfunction(impl.function)
                ):
                    raise PluginError(
                        name,
                        f"implements {impl_name} as `async def`, but the core calls it "
                        "synchronously; make it a plain `def`",
                    )

    @property
    def names(self) -> list[str]:
        """Registered plugin names, the core's first."""
        return [CORE_PLUGIN, *self.policy.plugins]

    def call(self, plugin: str, hook: str, **kwargs: Any) -> list[Any]:
        """Call ``hook`` on one plugin only; return its results."""
        caller = self.pm.subset_hook_caller(
            hook, remove_plugins=[p for n, p in self.pm.list_name_plugin() if n != plugin]
        )
        try:
            return list(caller(**kwargs) or []) if not _firstresult(caller) else [caller(**kwargs)]
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(plugin, f"hook {hook} raised {type(e).__name__}: {e}") from e

    async def call_async(self, hook: str, *, reverse: bool = False, **kwargs: Any) -> None:
        """Call a fan-out hook whose implementations may be ``async def``, in
        registration order (core first, then policy order; ``reverse`` for
        shutdown); await every result before re-raising the first failure, so
        no coroutine is left un-awaited."""
        first: PluginError | None = None
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        for impl in reversed(impls) if reverse else impls:
            try:
                result = impl.function(**{a: kwargs[a] for a in impl.argnames if a in kwargs})
                if inspect.isawaitable(result):
                    await result
            except Exception as e:
                if first is None and isinstance(e, PluginError):
                    first = e  # the plugin's own words, naming it already
                elif first is None:
                    first = PluginError(
                        impl.plugin_name, f"hook {hook} raised {type(e).__name__}: {e}"
                    )
                    first.__cause__ = e
        if first is not None:
            raise first


def _firstresult(caller: Any) -> bool:
    opts = getattr(caller, "spec", None)
    return bool(opts and opts.opts.get("firstresult"))
