"""Stage timeouts: one watchdog timer bounds every stage call of a pipeline."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from veil.pipeline import _Watchdog


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_call_within_its_deadline_returns_normally() -> None:
    async def main() -> None:
        dog = _Watchdog(0.005)
        await dog.run(1.0, asyncio.sleep(0.01))
        assert not dog._watched

    run(main())


def test_an_overrunning_call_raises_timeout_and_leaves_no_cancel_behind() -> None:
    async def main() -> float:
        dog = _Watchdog(0.005)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await dog.run(0.03, asyncio.sleep(5))
        took = loop.time() - t0
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0.001)  # the task still runs: nothing left cancelled
        return took

    took = run(main())
    assert 0.03 <= took < 2  # fires after its deadline, long before the sleep ends


def test_a_stage_that_swallows_its_cancellation_still_times_out() -> None:
    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)

    async def main() -> None:
        dog = _Watchdog(0.005)
        with pytest.raises(TimeoutError):
            await dog.run(0.02, stubborn())
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0

    run(main())


def test_an_outside_cancellation_stays_a_cancellation() -> None:
    async def main() -> None:
        dog = _Watchdog(0.005)
        inner = asyncio.create_task(dog.run(10.0, asyncio.sleep(5)))
        await asyncio.sleep(0.01)
        inner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await inner
        assert not dog._watched

    run(main())


def test_concurrent_calls_each_get_their_own_deadline() -> None:
    async def main() -> list[str]:
        dog = _Watchdog(0.005)

        async def one(timeout: float, work: float) -> str:
            try:
                await dog.run(timeout, asyncio.sleep(work))
            except TimeoutError:
                return "timeout"
            return "ok"

        got = await asyncio.gather(one(0.02, 0.5), one(1.0, 0.05), one(0.02, 0.001))
        assert not dog._watched
        await asyncio.sleep(0.02)
        assert dog._armed is None  # the timer disarms once nothing is watched
        return got

    assert run(main()) == ["timeout", "ok", "ok"]


def test_a_call_that_never_waits_runs_at_once_and_arms_no_timer() -> None:
    done: list[str] = []

    async def quick() -> None:
        done.append("ran")

    async def main() -> None:
        dog = _Watchdog(0.005)
        await dog.run(1.0, quick())
        assert done == ["ran"]
        assert not dog._watched and dog._armed is None

    run(main())


def test_a_call_that_fails_before_waiting_raises_its_own_error() -> None:
    async def broken() -> None:
        raise ValueError("bug")

    async def main() -> None:
        dog = _Watchdog(0.005)
        with pytest.raises(ValueError, match="bug"):
            await dog.run(1.0, broken())
        assert not dog._watched

    run(main())


def test_a_call_resumed_after_its_first_wait_gets_results_and_errors() -> None:
    """The part after the first suspension runs under the deadline and sees
    what it awaits (results, and errors it may handle) as a plain await would."""

    async def main() -> list[object]:
        dog = _Watchdog(0.005)
        loop = asyncio.get_running_loop()
        seen: list[object] = []
        ok: asyncio.Future[int] = loop.create_future()
        bad: asyncio.Future[int] = loop.create_future()
        loop.call_later(0.01, ok.set_result, 7)
        loop.call_later(0.02, bad.set_exception, KeyError("k"))

        async def stage() -> None:
            seen.append(await ok)
            try:
                await bad
            except KeyError as e:
                seen.append(repr(e))
            await asyncio.sleep(0)
            raise LookupError("after")

        with pytest.raises(LookupError, match="after"):
            await dog.run(1.0, stage())
        assert not dog._watched
        return seen

    assert run(main()) == [7, "KeyError('k')"]
