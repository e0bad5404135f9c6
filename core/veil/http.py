"""HTTP helpers of the core: request ids, body reading, error and JSON
responses, and the SSE response that cancels the upstream when the client
goes away."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .errors import BadRequest, GatewayError, PayloadTooLarge, UnsupportedMediaType
from .types import Chunk

__all__ = [
    "ClientClosed",
    "SSEResponse",
    "error_response",
    "json_response",
    "read_json",
    "request_id",
]

_RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ClientClosed(GatewayError):
    """The client went away before the answer was complete (nginx's 499)."""

    status = 499
    type = "client_closed"
    code = "client_disconnected"


def request_id(headers: Any) -> str:
    """The client's ``x-request-id`` if it is a sane token, else a new one."""
    rid = headers.get("x-request-id")
    if rid and _RID.match(rid):
        return rid
    return "req_" + uuid.uuid4().hex


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response serialized once with orjson."""
    return Response(orjson.dumps(body), status, headers, "application/json")


def error_response(error: GatewayError, rid: str) -> Response:
    """An OpenAI-shaped error response carrying ``x-request-id``."""
    headers = {"x-request-id": rid, **error.headers}
    return Response(orjson.dumps(error.body()), error.status, headers, "application/json")


async def read_json(request: Request, limit: int) -> Any:
    """Read and parse a JSON body of at most ``limit`` bytes.

    :raises UnsupportedMediaType: a content type other than JSON.
    :raises PayloadTooLarge: the body is over the policy's limit.
    :raises BadRequest: the body is not valid JSON.
    """
    ctype = request.headers.get("content-type")
    if ctype is not None:
        base = ctype.split(";", 1)[0].strip().lower()
        if base != "application/json" and not base.endswith("+json"):
            raise UnsupportedMediaType(
                f"Content-Type {base or '(empty)'!r} is not supported; send the body as "
                "JSON with 'Content-Type: application/json'."
            )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(
                    f"The request body is {int(declared)} bytes; this gateway accepts at "
                    f"most {limit}."
                )
        except ValueError:
            raise BadRequest("Invalid Content-Length header.") from None
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise ClientClosed("The client went away while sending the request.") from None
    else:
        parts: list[bytes] = []
        size = 0
        try:
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise PayloadTooLarge(
                        f"The request body is over this gateway's limit of {limit} bytes."
                    )
                parts.append(part)
        except ClientDisconnect:
            raise ClientClosed("The client went away while sending the request.") from None
        raw = b"".join(parts)
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequest(
            f"The request body is not valid JSON ({e.msg} at position {e.pos}).",
            code="invalid_json",
        ) from None


_DONE = b"data: [DONE]\n\n"


class SSEResponse:
    """Streams chunks as server-sent events and watches for the client going
    away: on disconnect the chunk iterator is cancelled at once (closing the
    upstream request), rather than at the next write.

    ``on_end(outcome)`` is awaited exactly once with ``"done"``, an
    :class:`GatewayError` raised mid-stream, or a :class:`ClientClosed`.
    """

    def __init__(
        self,
        chunks: AsyncIterator[Chunk],
        headers: dict[str, str],
        on_complete: Callable[[], Awaitable[None]],
        on_end: Callable[[GatewayError | None], Awaitable[None]],
    ) -> None:
        self.chunks = chunks
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8")] + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]
        self.raw_headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.on_complete = on_complete
        self.on_end = on_end

    async def _pump(self, send: Send) -> GatewayError | None:
        dumps = orjson.dumps
        try:
            async for chunk in self.chunks:
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + dumps(chunk) + b"\n\n",
                        "more_body": True,
                    }
                )
            await self.on_complete()
        except Exception as e:
            if not isinstance(e, GatewayError):
                if isinstance(e, OSError):
                    raise
                e = GatewayError("The gateway failed mid-stream; the answer is incomplete.")
            body = b"data: " + dumps(e.body()) + b"\n\n"
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": body, "more_body": False})
            return e
        finally:
            await self.chunks.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": _DONE, "more_body": False})
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome: GatewayError | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            watch = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not pump.done():
                    pump.cancel()
                    outcome = ClientClosed("The client closed the stream.")
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await pump
                else:
                    watch.cancel()
                    try:
                        outcome = pump.result()
                    except OSError:
                        outcome = ClientClosed("The client closed the stream.")
        except OSError:
            outcome = ClientClosed("The client closed the stream.")
        finally:
            await self.on_end(outcome)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
