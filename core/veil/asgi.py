"""The hot path in raw ASGI: ``POST /v1/chat/completions`` and
``POST /v1/embeddings``.

Every other route goes through Starlette; these two skip its request,
response and middleware objects because they run on every call and the
gateway's own cost is measured against a bare pass-through (docs/operations.md).
Behaviour is the same as everywhere else: OpenAI-shaped errors, ``x-request-id``
on every response, metrics for every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import structlog

from .eager import Resume
from .errors import BadRequest, GatewayError, PayloadTooLarge, UnsupportedMediaType
from .http import NOT_READY, ClientClosed, log_internal_error, request_id
from .runtime import Runtime
from .types import Call, Chunk
from .validation import validate_chat, validate_embeddings

__all__ = ["HOT_PATHS", "VeilASGI"]

log = structlog.get_logger("veil.app")

HOT_PATHS = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]\n\n"
_FLUSH_BYTES = 64 * 1024


class VeilASGI:
    """The gateway's ASGI entry: the hot endpoints here, the rest to ``app``
    (the Starlette application, which also runs the lifespan)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            kind = HOT_PATHS.get(scope["path"])
            if kind is not None:
                await serve(self.state.gateway, kind, scope, receive, send)
                return
        elif scope["type"] == "lifespan":
            send = self._lifespan_send(send)
        await self.app(scope, receive, send)

    def _lifespan_send(self, send: Any) -> Any:
        """``send`` for the lifespan: a failed start-up is reported to the
        server as the error's message (the server logs it), not Starlette's
        traceback; the error stays in ``state.start_error``."""

        async def lifespan_send(message: dict[str, Any]) -> None:
            error = getattr(self.state, "start_error", None)
            if message.get("type") == "lifespan.startup.failed" and error is not None:
                message = {**message, "message": f"veil cannot start: {error}"}
            await send(message)

        return lifespan_send


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    # uvicorn (and the ASGI spec) give lower-cased names
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def _read_body(receive: Any, headers: dict[str, str], limit: int) -> Any:
    """Read and parse a JSON body of at most ``limit`` bytes.

    :raises UnsupportedMediaType: a content type other than JSON.
    :raises PayloadTooLarge: the body is over the policy's limit.
    :raises BadRequest: the body is empty or not valid JSON.
    :raises ClientClosed: the client went away mid-body.
    """
    ctype = headers.get("content-type")
    if ctype is not None:
        base = ctype.split(";", 1)[0].strip().lower()
        if base != "application/json" and not base.endswith("+json"):
            raise UnsupportedMediaType(
                f"Content-Type {base or '(empty)'!r} is not supported; send the body as "
                "JSON with 'Content-Type: application/json'."
            )
    declared = headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest("Invalid Content-Length header.") from None
        if size > limit:
            raise PayloadTooLarge(
                f"The request body is {size} bytes; this gateway accepts at most {limit}."
            )
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientClosed("The client went away while sending the request.")
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(
                f"The request body is over this gateway's limit of {limit} bytes."
            )
        if not message.get("more_body"):
            break
    if not body:
        raise BadRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(
            f"The request body is not valid JSON ({e.msg} at position {e.pos}).",
            code="invalid_json",
        ) from None


_NAMES: dict[str, bytes] = {}
"""Response header names as sent (lower-cased, latin-1): the stages' few
names, each encoded once."""


def _name(key: str) -> bytes:
    name = key.lower().encode("latin-1")
    if len(_NAMES) < 1024:
        _NAMES[key] = name
    return name


def _raw_headers(call: Call | None, rid: str, extra: dict[str, str] | None = None) -> list[Any]:
    out = [(b"x-request-id", rid.encode("latin-1"))]
    names = _NAMES
    if call is not None:
        if call.deployment is not None:
            out.append((b"x-veil-model", call.deployment.name.encode("latin-1")))
        if call.route is not None and call.route.reason != "policy":
            out.append((b"x-veil-route", call.route.reason.encode("latin-1")))
        for k, v in call.response_headers.items():
            out.append((names.get(k) or _name(k), v.encode("latin-1")))
    if extra:
        for k, v in extra.items():
            out.append((names.get(k) or _name(k), v.encode("latin-1")))
    return out


async def _send_json(send: Any, status: int, body: bytes, headers: list[Any]) -> None:
    headers.append(_JSON)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve(gw: Any, kind: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Serve one call end to end."""
    headers = _headers(scope)
    rid = request_id(headers)
    rt: Runtime | None = gw.runtime
    if rt is None:
        await _send_json(send, 503, orjson.dumps(NOT_READY.body()), _raw_headers(None, rid))
        return
    t0 = time.perf_counter()
    rt.acquire()
    call: Call | None = None
    status = 500
    try:
        try:
            principal = rt.authenticate(headers)
            body = await _read_body(receive, headers, rt.max_body)
            if kind == "chat":
                validate_chat(body)
            else:
                validate_embeddings(body)
            call = rt.new_call(rid, kind, body, principal, headers)  # type: ignore[arg-type]
            if call.stream:
                chunks = await rt.open_stream(call)
            else:
                answer = orjson.dumps(await rt.complete(call))
        except GatewayError as e:
            status = e.status
            if status != 499:
                await _send_json(
                    send, status, orjson.dumps(e.body()), _raw_headers(call, rid, e.headers)
                )
            return
        except Exception as e:
            if call is not None:
                await rt.fail(call, GatewayError("internal error"))
            log_internal_error(rid, e)
            error = GatewayError(f"The gateway failed to handle the request; request id {rid}.")
            await _send_json(send, 500, orjson.dumps(error.body()), _raw_headers(call, rid))
            return
        if not call.stream:
            status = 200
            await _send_json(send, 200, answer, _raw_headers(call, rid))
            return
        outcome = await _stream(rt, call, chunks, receive, send, _raw_headers(call, rid))
        status = 200 if outcome is None else outcome.status
        if outcome is not None:
            await rt.fail(call, outcome)
            if isinstance(outcome, ClientClosed):
                log.info("client_disconnected", request_id=rid)
    finally:
        rt.release()
        dep = call.deployment.name if call is not None and call.deployment else ""
        total = time.perf_counter() - t0
        rt.metrics.observe(kind, dep, status, total, call.upstream_seconds if call else 0.0)


async def _stream(
    rt: Runtime,
    call: Call,
    chunks: AsyncIterator[Chunk],
    receive: Any,
    send: Any,
    headers: list[Any],
) -> GatewayError | None:
    """Send the stream as server-sent events; return ``None`` when complete,
    else the error that ended it (a :class:`ClientClosed` on disconnect).

    A watcher task notices the client going away at once (not at the next
    write) and cancels the pump (running in this task), which closes the
    upstream request.
    """
    await send({"type": "http.response.start", "status": 200, "headers": headers + _SSE_HEADERS})
    task = asyncio.current_task()
    assert task is not None
    state = {"watching": True, "gone": False}

    def on_disconnect(watch: asyncio.Future[None]) -> None:
        if state["watching"] and not watch.cancelled() and watch.exception() is None:
            state["gone"] = True
            task.cancel()

    watch = asyncio.ensure_future(_wait_disconnect(receive))
    watch.add_done_callback(on_disconnect)
    try:
        return await _pump(rt, call, chunks, send)
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()
        return ClientClosed("The client closed the stream.")
    except OSError:
        return ClientClosed("The client closed the stream.")
    finally:
        state["watching"] = False
        watch.cancel()


async def _pump(
    rt: Runtime, call: Call, chunks: AsyncIterator[Chunk], send: Any
) -> GatewayError | None:
    """Serialize chunks into SSE events. Chunks that are ready without waiting
    (several events in one upstream read, or a stage's buffered output) go
    out in one write; nothing that is ready is ever held back."""
    dumps = orjson.dumps
    buf: list[bytes] = []
    size = 0
    try:
        while True:
            ready, value = _step(chunks)
            if ready is _WAIT:
                if buf:
                    message = {
                        "type": "http.response.body",
                        "body": b"".join(buf),
                        "more_body": True,
                    }
                    buf, size = [], 0
                    try:
                        await send(message)
                    except BaseException:
                        await _abandon(*value)
                        raise
                try:
                    value = await Resume(*value)
                except StopAsyncIteration:
                    break
            elif ready is _END:
                break
            event = b"data: " + dumps(value) + b"\n\n"
            buf.append(event)
            size += len(event)
            if size >= _FLUSH_BYTES:
                await send({"type": "http.response.body", "body": b"".join(buf), "more_body": True})
                buf, size = [], 0
        await rt.finish_stream(call)
    except Exception as e:
        if isinstance(e, OSError):
            raise
        if not isinstance(e, GatewayError):
            log_internal_error(call.id, e)
            e = GatewayError("The gateway failed mid-stream; the answer is incomplete.")
        buf.append(b"data: " + dumps(e.body()) + b"\n\n")
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"".join(buf), "more_body": False})
        return e
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    buf.append(_DONE)
    await send({"type": "http.response.body", "body": b"".join(buf), "more_body": False})
    return None


_READY, _WAIT, _END = object(), object(), object()


def _step(chunks: AsyncIterator[Chunk]) -> tuple[object, Any]:
    """Advance ``chunks`` without awaiting: ``(_READY, chunk)`` when the next
    chunk was ready at once, ``(_END, None)`` at the end, or ``(_WAIT, (awaitable,
    yielded))`` when it must wait (then await ``Resume(awaitable, yielded)``)."""
    step = chunks.__anext__()
    try:
        yielded = step.send(None)  # type: ignore[attr-defined]
    except StopIteration as done:
        return _READY, done.value
    except StopAsyncIteration:
        return _END, None
    return _WAIT, (step, yielded)


async def _abandon(step: Any, yielded: Any) -> None:
    """Unwind a step :func:`_step` started and nobody will finish: throw
    ``CancelledError`` into it and drive its clean-up (the stream's ``finally``
    blocks) to the end, so the stream can be closed."""
    try:
        yielded = step.throw(asyncio.CancelledError())
    except BaseException:
        return
    with contextlib.suppress(BaseException):
        await Resume(step, yielded)


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
