"""A circuit breaker per deployment.

``closed``: calls go. After ``failures`` failed attempts within ``window_s``
seconds it turns ``open``: the deployment is skipped. After ``cooldown_s`` the
next call that may use it becomes the probe (``half_open``); the probe's
success closes the breaker, its failure opens it again. Until the probe ends,
other calls skip the deployment (a probe that never reports, because an
earlier deployment of its route answered, is replaced after another cooldown).

Each transition is logged (``routing_breaker``, with the deployment's name and
both states) and counted in the metrics (:class:`~veil_routing.metrics.RoutingMetrics`).
Everything runs on the event loop: no locks.

A breaker outlives a policy reload: a :class:`BreakerBoard` given the
gateway's ``carried`` memory hands a new policy the breaker of every
deployment it kept unchanged (same settings, same breaker settings), so a
deployment that is down stays skipped instead of taking traffic again after
every reload.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable

import structlog

__all__ = ["Breaker", "BreakerBoard", "State"]

log = structlog.get_logger("veil_routing.breaker")

State = str
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

Transition = Callable[[str, str, str], None]
"""``on_transition(deployment, old_state, new_state)``."""


class Breaker:
    """The breaker of one deployment. ``clock`` is ``time.monotonic`` unless
    a test gives another."""

    __slots__ = (
        "_clock",
        "_failures",
        "_notify",
        "_probe_at",
        "cooldown",
        "limit",
        "name",
        "opened_at",
        "state",
        "window",
    )

    def __init__(
        self,
        name: str,
        *,
        failures: int,
        window_s: float,
        cooldown_s: float,
        on_transition: Transition,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.limit = failures
        self.window = window_s
        self.cooldown = cooldown_s
        self.state: State = CLOSED
        self.opened_at = 0.0
        self._probe_at = 0.0
        self._failures: deque[float] = deque()
        self._notify = on_transition
        self._clock = clock

    def _move(self, new: State) -> None:
        old, self.state = self.state, new
        log.warning("routing_breaker", deployment=self.name, old=old, new=new)
        self._notify(self.name, old, new)

    def available(self) -> bool:
        """Whether a call may use the deployment now; in ``open`` past the
        cooldown, the first call asking becomes the probe (``half_open``)."""
        if self.state == CLOSED:
            return True
        now = self._clock()
        if self.state == OPEN:
            if now - self.opened_at < self.cooldown:
                return False
            self._move(HALF_OPEN)
            self._probe_at = now
            return True
        if now - self._probe_at >= self.cooldown:  # the probe never reported: another
            self._probe_at = now
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 otherwise)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.cooldown - (self._clock() - self.opened_at))

    def success(self) -> None:
        """An attempt succeeded: a probe closes the breaker."""
        if self.state != CLOSED:
            self._failures.clear()
            self._move(CLOSED)

    def failure(self) -> None:
        """An attempt failed: count it; open at the limit; a failed probe reopens."""
        now = self._clock()
        if self.state == HALF_OPEN:
            self.opened_at = now
            self._move(OPEN)
            return
        if self.state == OPEN:
            return
        window = self._failures
        window.append(now)
        while window and now - window[0] > self.window:
            window.popleft()
        if len(window) >= self.limit:
            window.clear()
            self.opened_at = now
            self._move(OPEN)


class BreakerBoard:
    """The breakers of a policy's deployments, by deployment name (created on
    first use). With ``carried`` (a dict the gateway keeps across policy
    loads), a deployment's breaker is looked up there by its ``identity``
    (the deployment's settings) and these breaker settings before a new one
    is made; :meth:`forget_others` drops what the current policy no longer
    uses."""

    __slots__ = ("_breakers", "_carried", "_kw", "_used")

    def __init__(
        self,
        *,
        failures: int,
        window_s: float,
        cooldown_s: float,
        on_transition: Transition,
        clock: Callable[[], float] = time.monotonic,
        carried: dict[Hashable, Breaker] | None = None,
    ) -> None:
        self._kw = {
            "failures": failures,
            "window_s": window_s,
            "cooldown_s": cooldown_s,
            "on_transition": on_transition,
            "clock": clock,
        }
        self._breakers: dict[str, Breaker] = {}
        self._carried = carried
        self._used: set[Hashable] = set()

    def get(self, name: str, identity: Hashable = None) -> Breaker:
        """The breaker of deployment ``name``; ``identity`` (hashable, equal
        for an unchanged deployment) finds it in the carried memory."""
        b = self._breakers.get(name)
        if b is None:
            carried = self._carried
            key = None
            if carried is not None and identity is not None:
                kw = self._kw
                key = (identity, kw["failures"], kw["window_s"], kw["cooldown_s"])
                b = carried.get(key)
                self._used.add(key)
            if b is None:
                b = Breaker(name, **self._kw)  # type: ignore[arg-type]
                if key is not None and carried is not None:
                    carried[key] = b
            self._breakers[name] = b
        return b

    def forget_others(self) -> None:
        """Drop from the carried memory every breaker this board did not use."""
        carried = self._carried
        if carried is not None:
            for key in [k for k in carried if k not in self._used]:
                del carried[key]

    def states(self) -> dict[str, State]:
        """Every known breaker's state, by deployment name."""
        return {name: b.state for name, b in self._breakers.items()}
