"""Shared helpers of veil-budget's tests."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import openai

from veil.testing import TEST_KEY

OUTPUT_PRICE = 1000.0
"""USD per million output tokens of ``priced``: 100 output tokens cost $0.10."""
CALL_TOKENS = 100
CALL_USD = CALL_TOKENS * OUTPUT_PRICE / 1_000_000


T = TypeVar("T")


def deployments(url: str) -> list[dict[str, Any]]:
    """``priced`` (output only, so a call asking for ``CALL_TOKENS`` and
    getting them costs exactly its reservation) and ``both`` (input and
    output prices) on the mock upstream."""
    common = {"provider": "openai", "api_base": url + "/v1", "max_retries": 0}
    return [
        {"name": "priced", "model": "up-1", "output_per_mtok": OUTPUT_PRICE, **common},
        {
            "name": "both",
            "model": "up-2",
            "input_per_mtok": 2.0,
            "output_per_mtok": 8.0,
            "cached_input_per_mtok": 0.5,
            **common,
        },
    ]


def fixed_usage(mock: Any, prompt: int = 10, completion: int = CALL_TOKENS) -> None:
    """Make the mock upstream report this usage on every chat answer."""
    mock.app.settings.usage = {"prompt_tokens": prompt, "completion_tokens": completion}


async def burst(
    url: str,
    count: int,
    *,
    stream: bool = False,
    key: str = TEST_KEY,
    request_id: str | None = None,
) -> list[Any]:
    """``count`` concurrent chat calls of ``CALL_TOKENS`` output tokens on
    ``priced`` (all sending ``x-request-id: request_id`` when given); each
    result is the text (success) or the ``openai`` error."""
    headers = {"x-request-id": request_id} if request_id else None
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=key, max_retries=0, default_headers=headers
    ) as client:

        async def one() -> Any:
            try:
                if stream:
                    parts = []
                    async for chunk in await client.chat.completions.create(
                        model="priced",
                        messages=[{"role": "user", "content": "hi"}],
                        max_tokens=CALL_TOKENS,
                        stream=True,
                    ):
                        parts += [c.delta.content or "" for c in chunk.choices]
                    return "".join(parts)
                answer = await client.chat.completions.create(
                    model="priced",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=CALL_TOKENS,
                )
                return answer.choices[0].message.content
            except openai.APIError as e:
                return e

        return await asyncio.gather(*(one() for _ in range(count)))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
