"""The exception tree of veil.

Every error a client can see is a :class:`GatewayError`; it carries the HTTP
status and the OpenAI error ``type`` and ``code`` it is reported with. Messages
say what happened and how to fix it, and never contain request text or
personal data: use ids, counts and entity types.

::

    VeilError
    ├── PolicyError            a policy file is unsigned, tampered, expired, rolled back or invalid
    ├── PluginError            a plugin is missing, broken, the wrong version, or misbehaved
    └── GatewayError           reported to the client as {"error": {...}} with a status
        ├── BadRequest             400 invalid_request_error
        ├── AuthenticationFailed   401 invalid_request_error / invalid_api_key
        ├── PermissionDenied       403 permission_error
        ├── NotFound               404 invalid_request_error / model_not_found
        ├── PayloadTooLarge        413 invalid_request_error / request_too_large
        ├── UnsupportedMediaType   415 invalid_request_error / unsupported_content_type
        ├── Refused                429 (budgets, rate limits; carries Retry-After)
        ├── StageFailed            500 or 503: a pipeline stage failed closed
        ├── Unavailable            503 server_error: a step the call needs cannot run now
        └── UpstreamError          502 upstream answered badly
            ├── UpstreamUnavailable    503 upstream unreachable
            ├── UpstreamTimeout        504 upstream too slow
            └── UpstreamRejected       the upstream's own 4xx/429, passed on
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationFailed",
    "BadRequest",
    "GatewayError",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "PluginError",
    "PolicyError",
    "Refused",
    "StageFailed",
    "Unavailable",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "VeilError",
]


class VeilError(Exception):
    """Base class of every error veil raises on purpose."""


class PolicyError(VeilError):
    """A policy cannot be used: bad signature, unknown key, expired, not yet
    valid, wrong audience, rolled back, or not a valid policy document."""


class PluginError(VeilError):
    """A plugin named by the policy is missing, broken or the wrong version,
    or one of its hooks misbehaved. The message names the plugin."""

    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(f"plugin {plugin!r} {message}")
        self.plugin = plugin


class GatewayError(VeilError):
    """An error reported to the client in OpenAI's shape.

    :param message: one or two sentences: what happened, and the likely fix.
    :param status: HTTP status.
    :param type: OpenAI error type (``invalid_request_error``, ...).
    :param code: machine-readable code, or ``None``.
    :param param: the request field at fault, or ``None``.
    :param headers: extra response headers (``Retry-After``, ...).
    """

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"

    @classmethod
    def model(cls, name: object) -> NotFound:
        """The 404 for a model that is unknown or not allowed for the caller's
        team (the two are not told apart, so model names do not leak)."""
        return cls(
            f"The model '{name}' does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_type"


class Refused(GatewayError):
    """Budget or rate limit: 429, with ``Retry-After`` when known."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        headers = dict(kw.pop("headers", None) or {})
        if retry_after is not None:
            headers.setdefault("retry-after", str(max(1, int(retry_after + 0.999))))
        super().__init__(message, headers=headers, **kw)
        self.retry_after = retry_after


class Unavailable(GatewayError):
    """A step the call needs cannot run now (its store or model is down or
    overloaded): 503, the request was not forwarded. Plugins set ``code``
    (``pii_unavailable``, ``budget_unavailable``)."""

    status = 503
    type = "server_error"
    code = "unavailable"


class StageFailed(GatewayError):
    """A pipeline stage failed closed. The client sees the request id, the
    audit record names the plugin."""

    status = 500
    type = "server_error"
    code = "stage_failed"

    def __init__(self, message: str, *, stage: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.stage = stage


class UpstreamError(GatewayError):
    """The upstream failed. ``retryable`` says whether the same deployment may
    be tried again after a backoff; ``failover`` whether the next deployment
    of the route may be tried; ``retry_after`` is the upstream's hint."""

    status = 502
    type = "api_error"
    code = "upstream_error"
    retryable = True
    failover = True

    def __init__(
        self,
        message: str,
        *,
        deployment: str | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
        failover: bool | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.deployment = deployment
        self.retry_after = retry_after
        if retryable is not None:
            self.retryable = retryable
        if failover is not None:
            self.failover = failover


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    retryable = False


class UpstreamRejected(UpstreamError):
    """The upstream refused the request itself (its 400, 404, 422, 429...):
    passed on with the upstream's status and error fields. Only a 429 is
    retried; other refusals are the request's fault and fail over nowhere."""

    retryable = False
    failover = False
