"""Load balancing across the deployments of one model.

- ``round_robin``: each call starts at the next deployment in turn.
- ``least_inflight``: the deployment with the fewest calls in flight first
  (ties in turn).
- ``latency``: the lowest exponentially weighted moving average of attempt
  latency first (a deployment never measured counts as 0, so it gets tried).

The order returned is the whole failover chain for that model: the chosen
deployment, then the others in the same order of preference. Everything runs
on the event loop: no locks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from veil.types import Deployment

from .settings import Balance

__all__ = ["Balancer", "DeploymentStats"]


class DeploymentStats:
    """What the balancer knows of one deployment."""

    __slots__ = ("ewma", "inflight", "label")

    def __init__(self, label: str) -> None:
        self.label = label
        self.inflight = 0
        self.ewma: float | None = None


class Balancer:
    """Orders the deployments of each model for one policy."""

    __slots__ = ("_alpha", "_counters", "_kinds", "_stats", "default")

    def __init__(
        self,
        deployments: Sequence[Deployment],
        *,
        default: Balance,
        per_model: dict[str, Balance],
        alpha: float,
    ) -> None:
        self.default = default
        self._kinds = per_model
        self._alpha = alpha
        self._counters: dict[str, itertools.count[int]] = {}
        by_name: dict[str, list[Deployment]] = {}
        for d in deployments:
            by_name.setdefault(d.name, []).append(d)
        self._stats: dict[Deployment, DeploymentStats] = {}
        for name, deps in by_name.items():
            for i, d in enumerate(deps):
                self._stats[d] = DeploymentStats(name if len(deps) == 1 else f"{name}[{i}]")

    def stats(self, dep: Deployment) -> DeploymentStats:
        """The stats of ``dep`` (a deployment of this policy)."""
        return self._stats[dep]

    def label(self, dep: Deployment) -> str:
        """A name for logs and metrics: the deployment's name, with its index
        among same-named deployments when there are several (``gpt-4o[1]``)."""
        return self._stats[dep].label

    def order(self, model: str, deps: list[Deployment]) -> list[Deployment]:
        """``deps`` (the usable deployments of ``model``, policy order) in the
        order to try them."""
        n = len(deps)
        if n < 2:
            return deps
        counter = self._counters.get(model)
        if counter is None:
            counter = self._counters[model] = itertools.count()
        start = next(counter) % n
        rotated = deps[start:] + deps[:start]
        kind = self._kinds.get(model, self.default)
        if kind == "round_robin":
            return rotated
        stats = self._stats
        if kind == "least_inflight":
            return sorted(rotated, key=lambda d: stats[d].inflight)
        return sorted(rotated, key=lambda d: stats[d].ewma or 0.0)

    def observe_latency(self, dep: Deployment, seconds: float) -> None:
        """Fold a successful attempt's duration into the moving average."""
        s = self._stats.get(dep)
        if s is None:
            return
        s.ewma = seconds if s.ewma is None else s.ewma + self._alpha * (seconds - s.ewma)

    def started(self, dep: Deployment) -> None:
        """A call was routed to ``dep`` first."""
        s = self._stats.get(dep)
        if s is not None:
            s.inflight += 1

    def finished(self, dep: Deployment) -> None:
        """That call is over."""
        s = self._stats.get(dep)
        if s is not None and s.inflight > 0:
            s.inflight -= 1
