"""``veil mock-upstream``: the mock model over HTTP, OpenAI-compatible.

A raw ASGI app (no framework) so that it costs as little CPU as possible in
benchmarks. Routes: ``POST /v1/chat/completions`` (streaming too),
``POST /v1/embeddings``, ``GET /v1/models``, and ``GET /_mock/stats``
(counters, for tests: requests, streams completed, streams aborted by the
client).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import orjson

from .engine import MockModel

__all__ = ["MockSettings", "MockUpstream"]

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass
class MockSettings:
    """Behaviour knobs. ``fail_rate`` is the share of requests answered with
    ``fail_status`` (and ``Retry-After: 0`` for 429). With ``record``, every
    POST body received is kept in ``received`` (raw bytes), for tests that
    check what reached the upstream. With ``reply``, chat calls answer as if
    the last user message had been ``reply`` (tools ignored): a way to make
    the model "say" something the request did not contain. With ``usage``
    (``{"prompt_tokens": P, "completion_tokens": C}``), chat answers report
    that usage instead of the model's count (streams: in the usage chunk
    when asked for; with ``stream_usage=False``, never)."""

    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    fail_rate: float = 0.0
    fail_status: int = 503
    seed: int | None = None
    record: bool = False
    reply: str | None = None
    usage: dict[str, int] | None = None
    stream_usage: bool = True
    received: list[bytes] = field(default_factory=list)
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "requests": 0,
            "streams_completed": 0,
            "streams_aborted": 0,
            "failed": 0,
        }
    )


class MockUpstream:
    """The ASGI app."""

    def __init__(self, settings: MockSettings | None = None) -> None:
        self.settings = settings or MockSettings()
        self.model = MockModel()
        self._random = random.Random(self.settings.seed)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        s = self.settings
        if method == "GET" and path == "/_mock/stats":
            return await _reply(send, 200, orjson.dumps(s.stats))
        if method == "GET" and path in ("/v1/models", "/models"):
            return await _reply(
                send,
                200,
                orjson.dumps(
                    {
                        "object": "list",
                        "data": [
                            {"id": "mock", "object": "model", "created": 0, "owned_by": "veil"}
                        ],
                    }
                ),
            )
        if method != "POST" or path not in (
            "/v1/chat/completions",
            "/chat/completions",
            "/v1/embeddings",
            "/embeddings",
        ):
            return await _reply(send, 404, _error("unknown route", "not_found"))
        raw = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        s.stats["requests"] += 1
        if s.record:
            s.received.append(raw)
        if s.latency_ms:
            await asyncio.sleep(s.latency_ms / 1000)
        if s.fail_rate and self._random.random() < s.fail_rate:
            s.stats["failed"] += 1
            extra = [(b"retry-after", b"0")] if s.fail_status == 429 else []
            return await _reply(send, s.fail_status, _error("mock failure", "mock_failure"), extra)
        try:
            body = orjson.loads(raw)
            if s.reply is not None and isinstance(body, dict) and "messages" in body:
                body = {**body, "messages": [{"role": "user", "content": s.reply}], "tools": None}
        except orjson.JSONDecodeError:
            return await _reply(send, 400, _error("invalid JSON", "invalid_json"))
        if not isinstance(body, dict):
            return await _reply(send, 400, _error("body must be an object", "invalid_type"))
        if path.endswith("/embeddings"):
            return await _reply(send, 200, orjson.dumps(self.model.embeddings(body)))
        if body.get("stream") is True:
            return await self._stream(body, receive, send)
        answer = self.model.chat(body)
        if s.usage is not None:
            answer["usage"] = _fixed_usage(s.usage)
        return await _reply(send, 200, orjson.dumps(answer))

    async def _stream(self, body: dict[str, Any], receive: Any, send: Any) -> None:
        s = self.settings
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        delay = s.chunk_delay_ms / 1000
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            for chunk in self.model.chat_chunks(body):
                if chunk.get("usage"):
                    if not s.stream_usage:
                        continue
                    if s.usage is not None:
                        chunk["usage"] = _fixed_usage(s.usage)
                if delay:
                    await asyncio.sleep(delay)
                if gone.done():
                    raise asyncio.CancelledError
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                        "more_body": True,
                    }
                )
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        except (OSError, asyncio.CancelledError):
            s.stats["streams_aborted"] += 1
            return
        finally:
            gone.cancel()
        s.stats["streams_completed"] += 1


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _fixed_usage(usage: dict[str, int]) -> dict[str, int]:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _error(message: str, code: str) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": "api_error", "param": None, "code": code}}
    )


async def _reply(send: Any, status: int, body: bytes, extra: list[Any] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON + (extra or [])})
    await send({"type": "http.response.body", "body": body})
