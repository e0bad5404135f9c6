"""Running the policy-ordered stages of a call.

Requests pass the stages in policy order, responses (and stream wrappers) in
reverse order. Each stage call is bounded by the stage's timeout (enforced
by one watchdog timer per pipeline, so a deadline fires at most one tick
late: a tenth of the shortest stage timeout, between 5 and 100 ms). A stage that
raises a :class:`GatewayError` refuses the call with that error; anything else
(a bug, a timeout) fails the call closed with a 500/503 naming the stage in
the audit trail, unless the policy set ``fail = "open"`` for it, in which case
the failure is logged, recorded on the call, and the stage is skipped.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import structlog

from .eager import Resume
from .errors import GatewayError, StageFailed
from .registry import StageSpec
from .types import Call, Chunk

__all__ = ["Pipeline"]

log = structlog.get_logger("veil.pipeline")


class _Deadline:
    """One stage call under watch: when it must end, and its task."""

    __slots__ = ("at", "cancelling", "expired", "task")

    def __init__(self, at: float, task: asyncio.Task[Any]) -> None:
        self.at = at
        self.task = task
        self.cancelling = task.cancelling()
        self.expired = False


class _Watchdog:
    """Stage timeouts with one timer for every call in flight.

    ``asyncio.timeout`` schedules and cancels a timer handle per stage call,
    a large share of a cheap stage's cost. Here a stage call registers its
    deadline in a set; a periodic check, armed only while the set is not
    empty, cancels the task of every call past its deadline, and the call
    turns that cancellation into a ``TimeoutError`` (as ``asyncio.timeout``
    does, leaving other cancellations alone).

    Most stage calls never wait (an in-memory look-up, a record copied into
    a mapped file): such a call is run to its end at once, and only one that
    suspends is registered, from its first suspension on. Nothing is lost:
    a timer can only stop a stage where it waits."""

    __slots__ = ("_armed", "_watched", "tick")

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self._watched: set[_Deadline] = set()
        self._armed: asyncio.TimerHandle | None = None

    async def run(self, timeout: float, aw: Awaitable[None] | None) -> None:
        """Await ``aw`` within ``timeout`` seconds (counted from its first
        suspension, see the class doc).

        :raises TimeoutError: it ran out of time (it was cancelled then).
        """
        waiting = self.step(timeout, aw)
        if waiting is not None:
            await waiting

    def step(self, timeout: float, aw: Awaitable[None] | None) -> Awaitable[None] | None:
        """Drive coroutine ``aw`` up to its first wait: ``None`` when it
        finished without waiting, else what to await to finish it within
        ``timeout`` seconds (as :meth:`run`). A plain function, so that a
        stage call that never waits costs no coroutine of the watchdog's
        (the pipeline's loops call this; :meth:`run` is the same in one await).
        ``aw`` is ``None`` when a stage's plain-``def`` hook finished at once.

        :raises Exception: what ``aw`` raised before its first wait.
        """
        if aw is None:
            return None
        if type(aw) is types.CoroutineType:
            try:
                first = aw.send(None)
            except StopIteration:
                return None  # done without waiting
            aw = Resume(aw, first)
        return self._watch(timeout, aw)

    async def _watch(self, timeout: float, aw: Awaitable[None]) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - stages always run in a task
            async with asyncio.timeout(timeout):
                await aw
            return
        deadline = _Deadline(loop.time() + timeout, task)
        self._watched.add(deadline)
        if self._armed is None:
            self._armed = loop.call_later(self.tick, self._check, loop)
        try:
            await aw
        except asyncio.CancelledError:
            if deadline.expired and task.uncancel() <= deadline.cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._watched.discard(deadline)
        if deadline.expired:  # the stage swallowed its cancellation
            task.uncancel()
            raise TimeoutError

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for d in self._watched:
            if not d.expired and d.at <= now:
                d.expired = True
                d.task.cancel()
        self._armed = loop.call_later(self.tick, self._check, loop) if self._watched else None


class Pipeline:
    """The stages of one policy, split by method, in the order each runs."""

    __slots__ = ("error", "finish", "request", "response", "stages", "stream", "_watchdog")

    def __init__(self, stages: Sequence[StageSpec]) -> None:
        self.stages = tuple(stages)
        self.request = tuple(s for s in stages if s.method("on_request"))
        self.response = tuple(s for s in reversed(stages) if s.method("on_response"))
        self.stream = tuple(s for s in reversed(stages) if s.method("wrap_stream"))
        self.error = tuple(s for s in reversed(stages) if s.method("on_error"))
        self.finish = tuple(s for s in reversed(stages) if s.method("on_finish"))
        shortest = min((s.timeout for s in stages), default=1.0)
        self._watchdog = _Watchdog(min(0.1, max(0.005, shortest / 10)))

    def _failed(self, call: Call, spec: StageSpec, hook: str, exc: BaseException) -> None:
        """Handle a non-GatewayError failure: raise (closed) or record (open)."""
        timed_out = isinstance(exc, TimeoutError)
        log.error(
            "stage_failed",
            request_id=call.id,
            plugin=spec.plugin,
            stage=spec.name,
            hook=hook,
            error=type(exc).__name__,
            timed_out=timed_out,
            fail_open=spec.fail_open,
        )
        call.decide(spec.name, "failed", hook=hook, error=type(exc).__name__, timed_out=timed_out)
        if spec.fail_open:
            return
        if timed_out:
            raise StageFailed(
                f"the {spec.name} stage did not finish in time and the policy fails it "
                f"closed; request id {call.id}",
                stage=spec.name,
                status=503,
                type="server_error",
                code="stage_timeout",
            ) from None
        raise StageFailed(
            f"the {spec.name} stage failed and the policy fails it closed; the request was "
            f"not forwarded. Request id {call.id}",
            stage=spec.name,
        ) from exc

    async def run_request(self, call: Call) -> None:
        """``on_request`` in policy order; stops early once a stage answered."""
        step = self._watchdog.step
        for spec in self.request:
            try:
                waiting = step(spec.timeout, spec.stage.on_request(call))
                if waiting is not None:
                    await waiting
            except GatewayError:
                raise
            except Exception as e:
                self._failed(call, spec, "on_request", e)
            if call.response is not None:
                call.answered_by = call.answered_by or spec.name
                return

    async def run_response(self, call: Call) -> None:
        """``on_response`` in reverse policy order."""
        step = self._watchdog.step
        for spec in self.response:
            try:
                waiting = step(spec.timeout, spec.stage.on_response(call))
                if waiting is not None:
                    await waiting
            except GatewayError:
                raise
            except Exception as e:
                self._failed(call, spec, "on_response", e)

    async def run_error(self, call: Call, error: GatewayError) -> None:
        """``on_error`` for every stage, in reverse order; never raises."""
        step = self._watchdog.step
        for spec in self.error:
            try:
                waiting = step(spec.timeout, spec.stage.on_error(call, error))
                if waiting is not None:
                    await waiting
            except Exception as e:
                log.error(
                    "stage_on_error_failed",
                    request_id=call.id,
                    plugin=spec.plugin,
                    stage=spec.name,
                    error=type(e).__name__,
                )

    async def run_finish(self, call: Call, *, failed: bool) -> None:
        """Every stage's ``on_finish``, in reverse policy order, once the call's
        outcome is settled and before the client gets it.

        On the success path (``failed=False``) a ``GatewayError`` a stage raises
        fails the call (``Runtime.fail`` then runs ``on_error`` and ``on_finish``
        again, with ``call.error`` set); any other exception fails it closed
        with ``StageFailed``, unless the stage is ``fail = "open"``. On the
        failure path nothing is raised: failures are logged.
        """
        step = self._watchdog.step
        for spec in self.finish:
            try:
                waiting = step(spec.timeout, spec.stage.on_finish(call))
                if waiting is not None:
                    await waiting
            except GatewayError as e:
                if not failed:
                    raise
                log.error(
                    "stage_on_finish_failed",
                    request_id=call.id,
                    stage=spec.name,
                    error=type(e).__name__,
                    code=e.code,
                )
            except Exception as e:
                timed_out = isinstance(e, TimeoutError)
                log.error(
                    "stage_failed",
                    request_id=call.id,
                    plugin=spec.plugin,
                    stage=spec.name,
                    hook="on_finish",
                    error=type(e).__name__,
                    timed_out=timed_out,
                    fail_open=spec.fail_open,
                )
                call.decide(
                    spec.name,
                    "failed",
                    hook="on_finish",
                    error=type(e).__name__,
                    timed_out=timed_out,
                )
                if failed or spec.fail_open:
                    continue
                raise StageFailed(
                    f"the {spec.name} stage could not finish the call and the policy fails it "
                    f"closed; request id {call.id}",
                    stage=spec.name,
                    status=503,
                    type="server_error",
                    code="stage_timeout" if timed_out else "stage_failed",
                ) from None

    def wrap_stream(self, call: Call, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """Wrap ``chunks`` with each stage's ``wrap_stream``, innermost being
        the last stage in policy order."""
        for spec in self.stream:
            chunks = _guarded(call, spec, spec.stage.wrap_stream(call, chunks))
        return chunks


async def _guarded(
    call: Call, spec: StageSpec, chunks: AsyncIterator[Chunk]
) -> AsyncIterator[Chunk]:
    """Turn a stream wrapper's unexpected failure into a ``StageFailed``.

    A stream cannot skip a broken wrapper half-way, so wrappers always fail
    closed: the stream ends with an error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except GatewayError:
        raise
    except Exception as e:
        log.error(
            "stage_failed",
            request_id=call.id,
            plugin=spec.plugin,
            stage=spec.name,
            hook="wrap_stream",
            error=type(e).__name__,
        )
        call.decide(spec.name, "failed", hook="wrap_stream", error=type(e).__name__)
        raise StageFailed(
            f"the {spec.name} stage failed while streaming; request id {call.id}",
            stage=spec.name,
        ) from e
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
