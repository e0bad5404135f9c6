"""The gateway process: the policy in force, reloads, and shutdown.

:class:`Gateway` owns the current :class:`~veil.runtime.Runtime`. A reload
(file change or SIGHUP) verifies the new policy and loads its plugins in full
before swapping it in; if anything fails, the old policy stays and the refusal
is logged loudly. Swapping is a single assignment: calls in flight keep the
runtime they started with, which is closed once they are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from . import gc_tuning
from .errors import PluginError, PolicyError
from .metrics import Metrics
from .policy import RollbackGuard, TrustedKeys, load_policy
from .runtime import Runtime

__all__ = ["Gateway", "GatewayConfig", "Runtime"]

log = structlog.get_logger("veil.gateway")

_OFF = frozenset({"0", "false", "no", "off"})


@dataclass
class GatewayConfig:
    """How to find and trust the policy.

    :param policy_path: the TOML file (its signature is ``<file>.sig``).
    :param trusted_keys: public key files or directories of ``*.pub``.
    :param audience: the environment this gateway serves; a policy for
        another audience is refused.
    :param state_dir: where the highest accepted version is persisted
        (rollback protection across restarts); ``None`` keeps it in memory.
    :param watch_interval: seconds between checks of the policy file for
        changes; 0 disables watching (SIGHUP still reloads).
    :param tune_gc: tune the process's garbage collector for serving once a
        policy is loaded (:mod:`veil.gc_tuning`); it is process-wide, so
        only a process that serves one gateway turns it on.
    """

    policy_path: Path
    trusted_keys: Sequence[str | Path]
    audience: str
    state_dir: Path | None = None
    watch_interval: float = 1.0
    extra_plugins: Mapping[str, Any] = field(default_factory=dict)
    tune_gc: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayConfig:
        """Read ``VEIL_POLICY``, ``VEIL_TRUSTED_KEYS`` (paths separated by
        ``os.pathsep``), ``VEIL_AUDIENCE``, ``VEIL_STATE_DIR``,
        ``VEIL_WATCH_INTERVAL`` and ``VEIL_GC_TUNING`` (``0``, ``false``,
        ``no`` or ``off`` keep the
        interpreter's collector settings; on by default: this is how a
        serving process is configured).

        :raises PolicyError: when a required variable is missing.
        """
        env = os.environ if env is None else env
        missing = [
            v for v in ("VEIL_POLICY", "VEIL_TRUSTED_KEYS", "VEIL_AUDIENCE") if not env.get(v)
        ]
        if missing:
            raise PolicyError(f"set {', '.join(missing)} (or use `veil serve --help`)")
        return cls(
            policy_path=Path(env["VEIL_POLICY"]),
            trusted_keys=[p for p in env["VEIL_TRUSTED_KEYS"].split(os.pathsep) if p],
            audience=env["VEIL_AUDIENCE"],
            state_dir=Path(env["VEIL_STATE_DIR"]) if env.get("VEIL_STATE_DIR") else None,
            watch_interval=float(env.get("VEIL_WATCH_INTERVAL", "1.0")),
            tune_gc=env.get("VEIL_GC_TUNING", "1").strip().lower() not in _OFF,
        )


class Gateway:
    """Holds the runtime in force and replaces it on reload."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.trusted = TrustedKeys.from_paths(config.trusted_keys)
        self.guard = RollbackGuard(config.state_dir)
        self.runtime: Runtime | None = None
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._stamp: tuple[int, int, int, int] | None = None

    def _file_stamp(self) -> tuple[int, int, int, int] | None:
        try:
            a = self.config.policy_path.stat()
            b = self.config.policy_path.with_name(self.config.policy_path.name + ".sig").stat()
        except FileNotFoundError:
            return None
        return (a.st_mtime_ns, a.st_size, b.st_mtime_ns, b.st_size)

    async def _load(self) -> Runtime:
        self._stamp = self._file_stamp()
        policy = load_policy(
            self.config.policy_path,
            self.trusted,
            audience=self.config.audience,
            guard=self.guard,
        )
        runtime = Runtime.build(
            policy,
            self.metrics,
            self.config.extra_plugins,
            state_dir=self.config.state_dir,
            policy_path=self.config.policy_path,
        )
        await runtime.start()
        return runtime

    async def start(self) -> None:
        """Load the policy; any failure propagates (the gateway must not serve).

        :raises PolicyError: the policy is refused.
        :raises PluginError: a plugin cannot be loaded or started.
        """
        runtime = await self._load()
        self.guard.record(runtime.policy)
        self.runtime = runtime
        self.metrics.policy_version.set(runtime.policy.version)
        log.info(
            "policy_accepted",
            version=runtime.policy.version,
            issuer=runtime.policy.issuer,
            audience=runtime.policy.audience,
            plugins=list(runtime.policy.plugins),
            sha256=runtime.policy.digest,
        )
        if self.config.tune_gc:
            gc_tuning.settle()
        if self.config.watch_interval > 0:
            self._watcher = asyncio.create_task(self._watch(), name="veil-policy-watch")
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(self.reload(reason="SIGHUP"))
            )

    async def reload(self, *, reason: str = "request") -> bool:
        """Verify and swap in the policy file; keep the old one on failure.

        :returns: whether the new policy is now in force.
        """
        async with self._lock:
            try:
                runtime = await self._load()
            except (PolicyError, PluginError) as e:
                self.metrics.policy_reloads.labels("refused").inc()
                log.error(
                    "policy_refused",
                    reason=reason,
                    error=str(e),
                    kept_version=self.runtime.policy.version if self.runtime else None,
                )
                return False
            self.guard.record(runtime.policy)
            old, self.runtime = self.runtime, runtime
            self.metrics.policy_version.set(runtime.policy.version)
            self.metrics.policy_reloads.labels("accepted").inc()
            log.info(
                "policy_accepted",
                reason=reason,
                version=runtime.policy.version,
                previous_version=old.policy.version if old else None,
                plugins=list(runtime.policy.plugins),
                sha256=runtime.policy.digest,
            )
            if old is not None:
                task = asyncio.create_task(self._retire(old))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            return True

    async def _retire(self, runtime: Runtime) -> None:
        await runtime.drained()
        await runtime.close()
        if self.config.tune_gc:
            del runtime
            gc_tuning.resettle()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.watch_interval)
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                # let a writer finish both files (policy, then signature)
                await asyncio.sleep(min(0.5, self.config.watch_interval))
                if self._file_stamp() != stamp:
                    continue
                await self.reload(reason="file changed")

    async def stop(self) -> None:
        """Stop watching, wait briefly for retiring runtimes, close the current one."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=10)
        if self.runtime is not None:
            await self.runtime.close()
            self.runtime = None
