"""The built-in ``mock`` provider: deterministic, in-process, no network.

A deployment may set ``options = { latency_ms = 20, chunk_delay_ms = 5 }``
to simulate a slow model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ..mock.engine import MockModel
from ..types import Call, Chunk, Deployment

__all__ = ["MockProvider"]


class MockProvider:
    """Answers from :class:`veil.mock.MockModel`; see :mod:`veil.mock.engine`."""

    def __init__(self) -> None:
        self.model = MockModel()

    @staticmethod
    async def _delay(deployment: Deployment, key: str) -> None:
        ms = deployment.extra.get(key)
        if isinstance(ms, int | float) and ms > 0:
            await asyncio.sleep(ms / 1000)

    async def chat(
        self, call: Call, deployment: Deployment, body: dict[str, Any]
    ) -> dict[str, Any]:
        await self._delay(deployment, "latency_ms")
        return self.model.chat(body)

    async def chat_stream(
        self, call: Call, deployment: Deployment, body: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        await self._delay(deployment, "latency_ms")
        return self._chunks(deployment, body)

    async def _chunks(self, deployment: Deployment, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        for chunk in self.model.chat_chunks(body):
            await self._delay(deployment, "chunk_delay_ms")
            yield chunk

    async def embeddings(
        self, call: Call, deployment: Deployment, body: dict[str, Any]
    ) -> dict[str, Any]:
        await self._delay(deployment, "latency_ms")
        return self.model.embeddings(body)

    async def aclose(self) -> None:
        return None
