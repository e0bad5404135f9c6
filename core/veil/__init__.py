"""veil: a privacy-first, OpenAI-compatible LLM gateway.

Plugin authors need only this module's public names: ``hookimpl`` to mark
hook implementations, the shared types, and the errors.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    BadRequest,
    GatewayError,
    PermissionDenied,
    PluginError,
    PolicyError,
    Refused,
    Unavailable,
    UpstreamError,
    VeilError,
)
from .hookspecs import hookimpl
from .types import Call, Chunk, Decision, Deployment, Principal, RouteDecision, Stage, Usage

try:
    __version__ = version("veil")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BadRequest",
    "Call",
    "Chunk",
    "Decision",
    "Deployment",
    "GatewayError",
    "PermissionDenied",
    "PluginError",
    "PolicyError",
    "Principal",
    "Refused",
    "RouteDecision",
    "Stage",
    "Unavailable",
    "UpstreamError",
    "Usage",
    "VeilError",
    "__version__",
    "hookimpl",
]
