"""The policy's ``[cache]`` section, validated.

Example::

    [cache]
    store = "memory"            # or "redis" (replicas share it; entries encrypted)
    ttl_s = 3600
    max_entries = 10000         # memory store: least recently used entries go first
    max_bytes = 67108864        # memory store: 64 MiB of stored answers at most
    any_temperature = false     # true: also cache calls with temperature > 0 (or none)

    [cache.semantic]
    enabled = true
    threshold = 0.98

Values a policy gets wrong (a negative TTL, a threshold above 1, an unknown
key) make the policy invalid, with the field named.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CacheSettings", "DEFAULT_THRESHOLD", "SemanticSettings"]

DEFAULT_THRESHOLD = 0.98
"""Cosine similarity above which two redacted questions share an answer: chosen
on MRPC's dev pairs with ``veil cache eval`` (see the README's numbers)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SemanticSettings(_Strict):
    """``[cache.semantic]``: answer a question phrased differently.

    :param enabled: look up by meaning when the exact key misses.
    :param threshold: cosine similarity (0..1] of the redacted last user
        messages at or above which a stored answer is served.
    :param max_per_partition: stored questions kept per partition (team,
        model, system prompt, tools, parameters, earlier turns); the oldest
        go first.
    :param max_chars: longer last user messages are not looked up by meaning
        (the model reads 512 tokens at most).
    """

    enabled: bool = False
    threshold: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = DEFAULT_THRESHOLD
    max_per_partition: Annotated[int, Field(gt=0)] = 1000
    max_chars: Annotated[int, Field(gt=0)] = 2000


class CacheSettings(_Strict):
    """The ``[cache]`` section.

    :param store: ``memory`` (in-process, bounded LRU) or ``redis`` (shared by
        replicas, entries encrypted with AES-GCM).
    :param ttl_s: seconds an answer is served from the cache.
    :param max_entries: memory store: entries kept at most.
    :param max_bytes: memory store: bytes of stored answers kept at most.
    :param max_entry_bytes: an answer larger than this is not stored.
    :param any_temperature: also cache calls whose ``temperature`` is not 0
        (absent means OpenAI's default, 1). Off by default: a sampled answer
        served again is no longer a sample.
    :param redis_url_env: the environment variable with the Redis URL.
    :param key_env: the environment variable with the encryption key (32
        random bytes, base64 or hex; ``veil cache keygen`` makes one);
        required with ``store = "redis"``.
    :param prefix: the Redis key prefix.
    """

    store: Literal["memory", "redis"] = "memory"
    ttl_s: Annotated[int, Field(gt=0)] = 3600
    max_entries: Annotated[int, Field(gt=0)] = 10_000
    max_bytes: Annotated[int, Field(gt=0)] = 64 * 1024 * 1024
    max_entry_bytes: Annotated[int, Field(gt=0)] = 1024 * 1024
    any_temperature: bool = False
    redis_url_env: Annotated[str, Field(min_length=1)] = "VEIL_CACHE_REDIS_URL"
    key_env: Annotated[str, Field(min_length=1)] = "VEIL_CACHE_KEY"
    prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")] = "veil-cache"
    semantic: SemanticSettings = SemanticSettings()
