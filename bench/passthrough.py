"""The floor: a bare Starlette pass-through proxy for POST /v1/chat/completions.

Starlette on uvicorn (uvloop + httptools, one worker, no access log) with ONE pooled
``aiohttp.ClientSession`` created in the lifespan. The request body is forwarded as raw
bytes (not parsed); the upstream's status, content type and body are returned. When the
upstream answers ``text/event-stream`` (i.e. the request had ``"stream": true``) the bytes
are relayed as they arrive through a ``StreamingResponse``.

It does nothing else on purpose: any Python gateway built on this stack pays at least this
much, so veil is judged against it.

Run: ``python -m bench.passthrough --upstream http://127.0.0.1:8001 --port 8002``
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM_ENV = "BENCH_UPSTREAM"
UPSTREAM_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-upstream"}


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Create the single pooled client session; close it on shutdown."""
    upstream = os.environ.get(UPSTREAM_ENV, "http://127.0.0.1:8001").rstrip("/")
    connector = aiohttp.TCPConnector(limit=1024, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    # No cookie jar: a proxy must not carry one client's upstream cookies to another.
    app.state.session = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    app.state.url = upstream + "/v1/chat/completions"
    try:
        yield
    finally:
        await app.state.session.close()


async def _relay(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Yield the upstream's bytes as they arrive; give the connection back to the pool."""
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    finally:
        upstream.release()


async def chat_completions(request: Request) -> Response:
    """Forward the raw body upstream; relay the answer (streamed when it is SSE)."""
    session: aiohttp.ClientSession = request.app.state.session
    body = await request.body()
    upstream = await session.post(request.app.state.url, data=body, headers=UPSTREAM_HEADERS)
    content_type = upstream.headers.get("Content-Type", "application/json")
    if content_type.startswith("text/event-stream"):
        return StreamingResponse(
            _relay(upstream), status_code=upstream.status, media_type="text/event-stream"
        )
    try:
        payload = await upstream.read()
    finally:
        upstream.release()
    return Response(payload, status_code=upstream.status, media_type=content_type)


app = Starlette(
    routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])],
    lifespan=lifespan,
)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and serve with uvicorn."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args(argv)
    os.environ[UPSTREAM_ENV] = args.upstream
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
