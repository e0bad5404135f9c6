"""Make upstream answers match OpenAI's published schemas.

Upstreams differ in small ways (vLLM, Ollama and llama.cpp omit ``refusal``
or ``logprobs``, send float ``created`` or ``system_fingerprint: null``).
These functions patch such gaps in place, cheaply, so every body veil returns
validates against OpenAI's OpenAPI document.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

__all__ = ["completion_to_chunks", "normalize_chunk", "normalize_completion"]


def _common(doc: dict[str, Any], obj: str) -> None:
    doc["object"] = obj
    created = doc.get("created")
    if not isinstance(created, int) or isinstance(created, bool):
        try:
            doc["created"] = int(created)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            doc["created"] = int(time.time())
    if doc.get("system_fingerprint", 0) is None:
        del doc["system_fingerprint"]
    if doc.get("service_tier", 0) is None:
        del doc["service_tier"]
    if not isinstance(doc.get("id"), str):
        doc["id"] = "chatcmpl-veil"


def normalize_completion(doc: dict[str, Any]) -> dict[str, Any]:
    """Patch a ``chat.completion`` in place; returns it."""
    _common(doc, "chat.completion")
    choices = doc.get("choices")
    if not isinstance(choices, list):
        doc["choices"] = choices = []
    for i, c in enumerate(choices):
        if not isinstance(c, dict):
            continue
        c.setdefault("index", i)
        c.setdefault("logprobs", None)
        c.setdefault("finish_reason", "stop")
        m = c.get("message")
        if not isinstance(m, dict):
            c["message"] = m = {"role": "assistant", "content": None}
        m.setdefault("role", "assistant")
        m.setdefault("content", None)
        m.setdefault("refusal", None)
    return doc


def normalize_chunk(chunk: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    """Patch a ``chat.completion.chunk`` in place; returns it.

    With ``include_usage`` every chunk carries ``usage`` (``null`` but on the
    usage chunk); without it, ``usage`` is removed.
    """
    _common(chunk, "chat.completion.chunk")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        chunk["choices"] = choices = []
    for i, c in enumerate(choices):
        if not isinstance(c, dict):
            continue
        c.setdefault("index", i)
        c.setdefault("logprobs", None)
        c.setdefault("finish_reason", None)
        if not isinstance(c.get("delta"), dict):
            c["delta"] = {}
    if include_usage:
        chunk.setdefault("usage", None)
    else:
        chunk.pop("usage", None)
    return chunk


def completion_to_chunks(doc: dict[str, Any], include_usage: bool) -> Iterator[dict[str, Any]]:
    """Replay a complete ``chat.completion`` as stream chunks (for answers a
    stage produced itself, such as a cache hit)."""
    base = {
        "id": doc.get("id", "chatcmpl-veil"),
        "object": "chat.completion.chunk",
        "created": doc.get("created", int(time.time())),
        "model": doc.get("model", ""),
    }
    for c in doc.get("choices") or []:
        m = c.get("message") or {}
        delta: dict[str, Any] = {"role": "assistant", "content": m.get("content")}
        if m.get("tool_calls"):
            delta["tool_calls"] = [
                {**tc, "index": k} for k, tc in enumerate(m["tool_calls"]) if isinstance(tc, dict)
            ]
        if m.get("refusal") is not None:
            delta["refusal"] = m["refusal"]
        for d, finish in ((delta, None), ({}, c.get("finish_reason") or "stop")):
            yield {
                **base,
                "choices": [
                    {
                        "index": c.get("index", 0),
                        "delta": d,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }
    if include_usage:
        yield {**base, "choices": [], "usage": doc.get("usage")}
