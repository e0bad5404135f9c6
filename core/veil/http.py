"""HTTP helpers of the core: request ids and OpenAI-shaped JSON responses."""

from __future__ import annotations

import itertools
import os
import re
import traceback
from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from starlette.responses import Response

from .errors import GatewayError

__all__ = [
    "ClientClosed",
    "NOT_READY",
    "error_response",
    "json_response",
    "log_internal_error",
    "request_id",
]

log = structlog.get_logger("veil.app")

NOT_READY = GatewayError(
    "The gateway is not ready: no policy is in force.", status=503, code="not_ready"
)

_RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PREFIX = "req_" + os.urandom(6).hex()
_counter = itertools.count(1)


class ClientClosed(GatewayError):
    """The client went away before the answer was complete (nginx's 499)."""

    status = 499
    type = "client_closed"
    code = "client_disconnected"


def request_id(headers: Mapping[str, str]) -> str:
    """The client's ``x-request-id`` if it is a sane token, else a new id,
    unique across processes (random per-process prefix and a counter)."""
    rid = headers.get("x-request-id")
    if rid and _RID.match(rid):
        return rid
    return f"{_PREFIX}{next(_counter):08x}"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response serialized once with orjson."""
    return Response(orjson.dumps(body), status, headers, "application/json")


def error_response(error: GatewayError, rid: str) -> Response:
    """An OpenAI-shaped error response carrying ``x-request-id``."""
    headers = {"x-request-id": rid, **error.headers}
    return Response(orjson.dumps(error.body()), error.status, headers, "application/json")


def log_internal_error(rid: str, exc: BaseException) -> None:
    """Log an unexpected exception by type and place only: its message and
    traceback text may quote request data."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
    log.error("internal_error", request_id=rid, error=type(exc).__name__, where=where)
