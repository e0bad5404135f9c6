"""The upstream SSE parser: event framing as servers really send it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from veil.errors import UpstreamError
from veil.providers.openai_compat import _sse_chunks
from veil.types import Deployment

DEP = Deployment(name="d", provider="openai", model="m")


class FakeContent:
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def iter_any(self) -> AsyncIterator[bytes]:
        for p in self.pieces:
            yield p


class FakeResponse:
    def __init__(self, pieces: list[bytes]) -> None:
        self.content = FakeContent(pieces)
        self.released = self.closed = False

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


def parse(pieces: list[bytes]) -> tuple[list[dict], FakeResponse]:
    resp = FakeResponse(pieces)

    async def collect() -> list[dict]:
        return [c async for c in _sse_chunks(DEP, resp)]  # type: ignore[arg-type]

    return asyncio.run(collect()), resp


def test_events_split_across_reads_and_batched_in_one_read() -> None:
    body = b'data: {"a": 1}\n\ndata: {"a": 2}\n\ndata: {"a": 3}\n\ndata: [DONE]\n\n'
    for cut in range(1, len(body)):
        chunks, resp = parse([body[:cut], body[cut:]])
        assert [c["a"] for c in chunks] == [1, 2, 3]
        assert resp.released and not resp.closed


def test_crlf_comments_multiline_data_and_no_space() -> None:
    body = (
        b": keep-alive\r\n\r\n"
        b'event: message\r\ndata:{"a": 1}\r\n\r\n'
        b'data: {"a":\r\ndata: 2}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    chunks, _ = parse([body])
    assert [c["a"] for c in chunks] == [1, 2]


def test_stream_without_done_marker_ends_cleanly() -> None:
    chunks, resp = parse([b'data: {"a": 1}\n\n'])
    assert chunks == [{"a": 1}] and resp.released


@pytest.mark.parametrize(
    "body",
    [
        b"data: {not json}\n\n",
        b'data: {"error": {"message": "overloaded"}}\n\n',
        b'data: {"a": 1}\n\ndata: {"a": 2',
    ],
    ids=["malformed", "error-event", "truncated"],
)
def test_broken_streams_raise_upstream_errors(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse([body])


def test_closing_early_closes_the_upstream_connection() -> None:
    resp = FakeResponse([b'data: {"a": 1}\n\ndata: {"a": 2}\n\n'])

    async def first() -> None:
        gen = _sse_chunks(DEP, resp)  # type: ignore[arg-type]
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(first())
    assert resp.closed and not resp.released
