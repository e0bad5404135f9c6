"""A tiny OpenAI-compatible mock upstream (raw ASGI on uvicorn), used until ``veil
mock-upstream`` exists or when ``--mock fallback`` is given.

POST /v1/chat/completions answers a fixed chat.completion JSON, or, for ``"stream": true``,
20 ``chat.completion.chunk`` SSE events (plus a usage chunk when
``stream_options.include_usage`` is set) and ``data: [DONE]``. Responses are pre-rendered
per model name so the mock spends as little CPU as possible per request.

Run: ``python -m bench._fallback_mock --port 8001``
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CREATED = 1767225600
COMPLETION_ID = "chatcmpl-bench0000000000000000000000"
ANSWER = (
    "The most likely cause is a changed bucket policy or rotated service account "
    "credentials from the deploy; check the storage audit log and the job's "
    "credential refresh log first."
)
ANSWER_WORDS = ANSWER.split(" ")
PROMPT_TOKENS = 142
COMPLETION_TOKENS = 38

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]


def _usage() -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }


def render_completion(model: str) -> bytes:
    """The non-streaming chat.completion body."""
    return orjson.dumps(
        {
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(),
        }
    )


def render_stream(model: str, include_usage: bool, n_chunks: int = 20) -> list[bytes]:
    """The SSE events of a streamed answer, one ``data: ...\\n\\n`` per element."""
    base = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_bench",
    }
    words, k = ANSWER_WORDS, min(n_chunks - 2, len(ANSWER_WORDS))
    pieces = [" ".join(words[i * len(words) // k : (i + 1) * len(words) // k]) for i in range(k)]
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": p if i == k - 1 else p + " "} for i, p in enumerate(pieces)]
    events = []
    for delta in deltas:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        events.append({**base, "choices": [choice]})
    events.append(
        {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
    )
    if include_usage:
        events.append({**base, "choices": [], "usage": _usage()})
    out = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events]
    out.append(b"data: [DONE]\n\n")
    return out


class MockApp:
    """Raw ASGI app; caches rendered responses per (model, stream, include_usage)."""

    def __init__(self) -> None:
        self._json: dict[str, bytes] = {}
        self._sse: dict[tuple[str, bool], list[bytes]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] != "POST" or scope["path"] != "/v1/chat/completions":
            await _respond(send, 404, b'{"error":{"message":"not found"}}')
            return
        body = await _read_body(receive)
        try:
            req = orjson.loads(body)
            model = str(req.get("model") or "bench-model")
        except (orjson.JSONDecodeError, AttributeError):
            await _respond(send, 400, b'{"error":{"message":"invalid JSON body"}}')
            return
        if req.get("stream"):
            opts = req.get("stream_options") or {}
            include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
            key = (model, include_usage)
            events = self._sse.get(key)
            if events is None:
                events = self._sse[key] = render_stream(model, include_usage)
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        payload = self._json.get(model)
        if payload is None:
            payload = self._json[model] = render_completion(model)
        await _respond(send, 200, payload)

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Send, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": payload})


app = MockApp()


def main(argv: list[str] | None = None) -> None:
    """Serve the mock with uvicorn (uvloop + httptools, one worker, no access log)."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
