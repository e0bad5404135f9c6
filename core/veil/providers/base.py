"""The provider contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from ..types import Call, Chunk, Deployment

__all__ = ["Provider"]


class Provider(Protocol):
    """An adapter to one kind of upstream. One instance serves every
    deployment naming it, for the life of a policy, on pooled connections.

    Failures raise :class:`veil.errors.UpstreamError` (or a subclass), whose
    ``retryable``/``failover`` flags steer retries and failover.
    """

    async def chat(
        self, call: Call, deployment: Deployment, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Send a non-streaming chat completion; return the parsed answer."""
        ...

    async def chat_stream(
        self, call: Call, deployment: Deployment, body: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        """Start a streaming chat completion. Returns once the upstream has
        accepted it (raising before that, so the call can still fail over),
        with an async iterator of parsed chunks; closing the iterator (or
        cancelling its consumer) must abort the upstream request."""
        ...

    async def embeddings(
        self, call: Call, deployment: Deployment, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Create embeddings; return the parsed answer."""
        ...

    async def aclose(self) -> None:
        """Release connections. Called once the policy is retired."""
        ...
