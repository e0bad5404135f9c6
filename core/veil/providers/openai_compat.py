"""The ``openai`` provider: any upstream speaking OpenAI's HTTP API (OpenAI,
Azure OpenAI, vLLM, Ollama, llama.cpp server, ...).

One pooled ``aiohttp.ClientSession`` per ``api_base`` lives as long as the
policy (aiohttp costs a fraction of httpx's CPU per request on this path; see
docs/operations.md). Deployment ``options``:

- ``auth = "bearer" | "api-key"`` (Azure uses ``api-key``), default bearer;
- ``headers = { ... }`` extra static headers;
- ``query = { "api-version" = "2024-10-21" }`` query parameters (Azure).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson

from ..errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from ..types import Call, Chunk, Deployment

__all__ = ["OpenAICompatProvider", "parse_retry_after"]

_JSON = {"content-type": "application/json"}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` (or ``retry-after-ms``) header; ``None`` if unusable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class OpenAICompatProvider:
    """See the module docstring."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._prepared: dict[
            tuple[Deployment, str], tuple[str, dict[str, str], aiohttp.ClientTimeout]
        ] = {}

    def _session(self, base: str) -> aiohttp.ClientSession:
        session = self._sessions.get(base)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
            session = aiohttp.ClientSession(
                connector=connector,
                json_serialize=lambda o: orjson.dumps(o).decode(),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
                # a gateway must never carry one client's upstream cookies to another
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._sessions[base] = session
        return session

    def _prepare(
        self, dep: Deployment, path: str
    ) -> tuple[str, dict[str, str], aiohttp.ClientTimeout]:
        key = (dep, path)
        cached = self._prepared.get(key)
        if cached is not None:
            return cached
        if not dep.api_base:
            raise UpstreamUnavailable(
                f"deployment {dep.name!r} has no api_base in the policy",
                deployment=dep.name,
                retryable=False,
            )
        headers = dict(_JSON)
        extra = dep.extra.get("headers")
        if isinstance(extra, dict):
            headers.update({str(k).lower(): str(v) for k, v in extra.items()})
        if dep.api_key_env:
            secret = os.environ.get(dep.api_key_env)
            if not secret:
                raise UpstreamUnavailable(
                    f"deployment {dep.name!r}: environment variable {dep.api_key_env} is not set",
                    deployment=dep.name,
                    retryable=False,
                )
            if dep.extra.get("auth") == "api-key":
                headers["api-key"] = secret
            else:
                headers["authorization"] = f"Bearer {secret}"
        url = dep.api_base + path
        query = dep.extra.get("query")
        if isinstance(query, dict) and query:
            url += "?" + urlencode({str(k): str(v) for k, v in query.items()})
        timeout = aiohttp.ClientTimeout(
            total=None, connect=dep.connect_timeout_s, sock_read=dep.timeout_s
        )
        prepared = (url, headers, timeout)
        self._prepared[key] = prepared
        return prepared

    async def _post(
        self, dep: Deployment, path: str, body: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        url, headers, timeout = self._prepare(dep, path)
        session = self._session(dep.api_base or "")
        try:
            resp = await session.post(
                url, data=orjson.dumps(body), headers=headers, timeout=timeout
            )
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout(
                f"deployment {dep.name!r} did not answer in time", deployment=dep.name
            ) from None
        except aiohttp.ClientConnectionError as e:
            raise UpstreamUnavailable(
                f"cannot reach deployment {dep.name!r} ({type(e).__name__})", deployment=dep.name
            ) from None
        if resp.status >= 400:
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                raw = b""
            finally:
                resp.release()
            raise self._error(dep, resp.status, resp.headers, raw)
        return resp

    @staticmethod
    def _error(dep: Deployment, status: int, headers: Any, raw: bytes) -> UpstreamError:
        retry_after = None
        ms = headers.get("retry-after-ms")
        if ms:
            r = parse_retry_after(ms)
            retry_after = r / 1000 if r is not None else None
        if retry_after is None:
            retry_after = parse_retry_after(headers.get("retry-after"))
        err: dict[str, Any] = {}
        try:
            doc = orjson.loads(raw)
            if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
                err = doc["error"]
        except orjson.JSONDecodeError:
            pass
        if status in (401, 403):
            return UpstreamError(
                f"deployment {dep.name!r} refused the gateway's credentials (upstream status "
                f"{status}); check its api_key_env",
                deployment=dep.name,
                retryable=False,
            )
        if status == 429:
            return UpstreamRejected(
                f"deployment {dep.name!r} is rate limited upstream",
                status=429,
                type="rate_limit_error",
                code="upstream_rate_limited",
                deployment=dep.name,
                retry_after=retry_after,
                retryable=True,
                failover=True,
                headers={"retry-after": str(int(retry_after + 0.999))} if retry_after else None,
            )
        if status >= 500:
            return UpstreamError(
                f"deployment {dep.name!r} failed (upstream status {status})",
                deployment=dep.name,
                retry_after=retry_after,
            )
        message = err.get("message") if isinstance(err.get("message"), str) else None
        return UpstreamRejected(
            message or f"the upstream refused the request (status {status})",
            status=status if status in (400, 404, 409, 413, 422) else 400,
            type=err.get("type") if isinstance(err.get("type"), str) else "invalid_request_error",
            code=err.get("code") if isinstance(err.get("code"), str) else "upstream_rejected",
            param=err.get("param") if isinstance(err.get("param"), str) else None,
            deployment=dep.name,
        )

    async def _json(self, dep: Deployment, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        try:
            raw = await resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout(
                f"deployment {dep.name!r} did not finish its answer in time", deployment=dep.name
            ) from None
        except aiohttp.ClientError as e:
            raise UpstreamUnavailable(
                f"deployment {dep.name!r} broke the connection ({type(e).__name__})",
                deployment=dep.name,
            ) from None
        finally:
            resp.release()
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            raise UpstreamError(
                f"deployment {dep.name!r} answered with something that is not a JSON object",
                deployment=dep.name,
            )
        return doc

    async def chat(
        self, call: Call, deployment: Deployment, body: dict[str, Any]
    ) -> dict[str, Any]:
        resp = await self._post(deployment, "/chat/completions", body)
        return await self._json(deployment, resp)

    async def embeddings(
        self, call: Call, deployment: Deployment, body: dict[str, Any]
    ) -> dict[str, Any]:
        resp = await self._post(deployment, "/embeddings", body)
        return await self._json(deployment, resp)

    async def chat_stream(
        self, call: Call, deployment: Deployment, body: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        resp = await self._post(deployment, "/chat/completions", body)
        return _sse_chunks(deployment, resp)

    async def aclose(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


async def _sse_chunks(dep: Deployment, resp: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
    """Parse an SSE body into chunk dicts; stop at ``[DONE]``. Closing the
    generator closes the upstream connection (aborting the upstream request)."""
    buf = b""
    done = False
    loads = orjson.loads
    try:
        async for piece in resp.content.iter_any():
            buf = buf + piece if buf else piece
            if b"\r" in buf:
                buf = buf.replace(b"\r\n", b"\n")
            if b"\n\n" not in buf:
                continue
            events = buf.split(b"\n\n")
            buf = events.pop()
            for event in events:
                payload: bytes | None
                if event.startswith(b"data: ") and b"\n" not in event:
                    payload = event[6:]
                else:
                    payload = _event_data(event)
                    if payload is None:
                        continue
                if payload == b"[DONE]":
                    done = True
                    return
                try:
                    chunk = loads(payload)
                except orjson.JSONDecodeError:
                    raise UpstreamError(
                        f"deployment {dep.name!r} sent a malformed stream event",
                        deployment=dep.name,
                    ) from None
                if isinstance(chunk, dict):
                    if "error" in chunk and "choices" not in chunk:
                        raise UpstreamError(
                            f"deployment {dep.name!r} reported an error mid-stream",
                            deployment=dep.name,
                        )
                    yield chunk
        if _event_data(buf.strip()) not in (None, b"[DONE]"):
            raise UpstreamError(
                f"deployment {dep.name!r} ended the stream mid-event", deployment=dep.name
            )
        done = True
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamTimeout(
            f"deployment {dep.name!r} stalled mid-stream", deployment=dep.name
        ) from None
    except aiohttp.ClientError as e:
        raise UpstreamUnavailable(
            f"deployment {dep.name!r} broke the stream ({type(e).__name__})", deployment=dep.name
        ) from None
    finally:
        if done:
            resp.release()
        else:
            resp.close()


def _event_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its ``data:`` lines joined), or ``None``
    for an event without data (comments, keep-alives, ``event:``-only)."""
    data = [
        line[5:].lstrip(b" ") if line.startswith(b"data:") else None for line in event.split(b"\n")
    ]
    parts = [d for d in data if d is not None]
    return b"\n".join(parts) if parts else None
