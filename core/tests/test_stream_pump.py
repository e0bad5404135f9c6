"""The SSE pump: ready chunks share one write, nothing ready is held back,
and an abandoned stream is always closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from veil.asgi import _pump


class FakeRuntime:
    def __init__(self) -> None:
        self.finished = False

    async def finish_stream(self, call: Any) -> None:
        self.finished = True


class FakeCall:
    id = "req_test"


def test_ready_chunks_are_batched_and_waits_flush() -> None:
    closed: list[bool] = []

    async def chunks() -> AsyncIterator[dict]:
        try:
            for i in range(3):
                yield {"i": i}
            await asyncio.sleep(0.01)  # the upstream is slow here
            for i in range(3, 5):
                yield {"i": i}
        finally:
            closed.append(True)

    writes: list[bytes] = []

    async def send(message: dict) -> None:
        writes.append(message["body"])

    rt = FakeRuntime()
    assert asyncio.run(_pump(rt, FakeCall(), chunks(), send)) is None  # type: ignore[arg-type]
    assert [w.count(b"data: {") for w in writes] == [3, 2]
    assert writes[-1].endswith(b"data: [DONE]\n\n")
    assert rt.finished and closed == [True]


def test_a_failed_write_while_waiting_still_closes_the_stream() -> None:
    closed: list[str] = []

    async def chunks() -> AsyncIterator[dict]:
        try:
            yield {"i": 0}
            await asyncio.sleep(10)
            yield {"i": 1}
        finally:
            await asyncio.sleep(0)  # clean-up that itself awaits
            closed.append("closed")

    async def send(message: dict) -> None:
        raise OSError("client gone")

    async def main() -> None:
        with pytest.raises(OSError, match="client gone"):
            await _pump(FakeRuntime(), FakeCall(), chunks(), send)  # type: ignore[arg-type]

    asyncio.run(asyncio.wait_for(main(), 5))
    assert closed == ["closed"]


def test_cancel_while_waiting_closes_the_stream() -> None:
    closed: list[str] = []

    async def chunks() -> AsyncIterator[dict]:
        try:
            yield {"i": 0}
            await asyncio.sleep(10)
            yield {"i": 1}
        finally:
            closed.append("closed")

    async def send(message: dict) -> None:
        await asyncio.sleep(0)

    async def main() -> None:
        task = asyncio.ensure_future(_pump(FakeRuntime(), FakeCall(), chunks(), send))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert closed == ["closed"]


def test_mid_stream_error_becomes_an_error_event() -> None:
    from veil.errors import UpstreamError

    async def chunks() -> AsyncIterator[dict]:
        yield {"i": 0}
        raise UpstreamError("deployment 'd' broke the stream")

    writes: list[dict] = []

    async def send(message: dict) -> None:
        writes.append(message)

    outcome = asyncio.run(_pump(FakeRuntime(), FakeCall(), chunks(), send))  # type: ignore[arg-type]
    assert isinstance(outcome, UpstreamError)
    assert b'"error"' in writes[-1]["body"] and writes[-1]["more_body"] is False
