"""HTTP helpers of the core: request ids and OpenAI-shaped JSON responses."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

from .errors import GatewayError

__all__ = ["ClientClosed", "error_response", "json_response", "request_id"]

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
