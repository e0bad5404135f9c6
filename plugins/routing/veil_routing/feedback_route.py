"""``POST /v1/feedback``: a caller scores one of its own calls.

Body: ``{"request_id": "<x-request-id of the call>", "score": 0.0..1.0}``,
authenticated with the API key that made the call. Answers ``{"object":
"feedback", "request_id": ..., "accepted": true}``; 404 when the policy has
feedback off, or the call is unknown (not routed by a pool, too old, or made
with another key); 400 for a malformed body; 401 without a valid key.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from veil.errors import AuthenticationFailed, BadRequest, NotFound

from .stage import RoutingStage, feedback_key

__all__ = ["feedback_endpoint"]


def _parse(raw: bytes) -> tuple[str, float]:
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_type")
    rid = body.get("request_id")
    if not isinstance(rid, str) or not 0 < len(rid) <= 200:
        raise BadRequest(
            "'request_id' must be the x-request-id of one of your calls (a string).",
            code="invalid_request_id",
            param="request_id",
        )
    score = body.get("score")
    if (
        isinstance(score, bool)
        or not isinstance(score, int | float)
        or not math.isfinite(score)
        or not 0 <= score <= 1
    ):
        raise BadRequest(
            "'score' must be a number from 0 (bad answer) to 1 (perfect answer).",
            code="invalid_score",
            param="score",
        )
    return rid, float(score)


async def feedback_endpoint(request: Request) -> Response:
    """Record a score for a call the caller made (see the module docstring)."""
    principal = request.state.principal
    if principal is None:
        raise AuthenticationFailed(
            "Send the API key that made the call as 'Authorization: Bearer sk-veil-...'."
        )
    runtime = request.state.runtime
    store = next(
        (
            spec.stage.feedback
            for spec in runtime.stages
            if isinstance(spec.stage, RoutingStage) and spec.stage.feedback is not None
        ),
        None,
    )
    if store is None:
        raise NotFound(
            "Feedback is off in this gateway's policy ([routing.feedback] enabled = true "
            "turns it on).",
            code="feedback_disabled",
        )
    rid, score = _parse(await request.body())
    if not store.feedback(feedback_key(principal.key_id, rid), score):
        raise NotFound(
            f"No call {rid!r} routed by a pool is known for this API key (feedback must come "
            "from the key that made the call, within a day).",
            code="unknown_request_id",
            param="request_id",
        )
    return Response(
        orjson.dumps({"object": "feedback", "request_id": rid, "accepted": True}),
        media_type="application/json",
    )
