"""Deterministic answers in OpenAI's shapes: chat completions (with tool
calls, JSON mode, ``n``, ``stop``, ``max_tokens``), stream chunks and
embeddings (float or base64).

The answer echoes the last user message, so what the model "saw" can be
checked from the answer. Token counts are estimates (about 4 characters a
token), stable for the same input. The engine never raises on odd input:
whatever reaches it gets an answer.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["MockModel", "count_tokens"]


def count_tokens(text: str) -> int:
    """A stable estimate: about one token per 4 characters, at least 1 for non-empty text."""
    return (len(text) + 3) // 4


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _example(schema: Any, hint: str, depth: int = 0) -> Any:
    """A small instance of a JSON schema (enough for tools and json_schema mode)."""
    if not isinstance(schema, dict) or depth > 6:
        return hint
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _example(schema[key][0], hint, depth + 1)
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "string")
    if t == "object" or "properties" in schema:
        props = schema.get("properties")
        if not isinstance(props, dict):
            props = {}
        return {k: _example(v, hint, depth + 1) for k, v in props.items()}
    if t == "array":
        return [_example(schema.get("items"), hint, depth + 1)]
    if t == "integer":
        return 1
    if t == "number":
        return 1.5
    if t == "boolean":
        return True
    if t == "null":
        return None
    return hint


class MockModel:
    """The deterministic model. ``created`` is fixed for a given instance so
    that answers are reproducible."""

    def __init__(self, *, created: int | None = None, embedding_dims: int = 64) -> None:
        self.created = created if created is not None else int(time.time())
        self.embedding_dims = embedding_dims

    # -- chat ---------------------------------------------------------------

    def _prompt(self, body: dict[str, Any]) -> tuple[str, int, list[dict[str, Any]]]:
        messages = body.get("messages")
        messages = (
            [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        )
        tokens = 3
        last_user = ""
        for m in messages:
            text = _text_of(m.get("content"))
            tokens += 4 + count_tokens(text)
            if m.get("role") == "user":
                last_user = text
        return last_user, tokens, messages

    def _answer(self, body: dict[str, Any], index: int, last_user: str) -> str:
        model = body.get("model") if isinstance(body.get("model"), str) else "mock"
        said = " ".join(last_user.split())
        suffix = f" (choice {index + 1})" if index else ""
        return (
            f"Mock answer from {model}{suffix}. You said: {said}"
            if said
            else (f"Mock answer from {model}{suffix}.")
        )

    def _choice_message(
        self, body: dict[str, Any], index: int, last_user: str, messages: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], str, int]:
        """(message, finish_reason, completion_tokens) for choice ``index``."""
        tools = body.get("tools")
        choice = body.get("tool_choice")
        last_role = messages[-1].get("role") if messages else None
        if isinstance(tools, list) and tools and choice != "none" and last_role != "tool":
            fn = None
            if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
                fn = choice["function"].get("name")
            tool = next(
                (
                    t
                    for t in tools
                    if isinstance(t, dict)
                    and isinstance(t.get("function"), dict)
                    and (fn is None or t["function"].get("name") == fn)
                ),
                None,
            )
            if tool is not None:
                f = tool["function"]
                name = f.get("name") if isinstance(f.get("name"), str) else "tool"
                args = _example(f.get("parameters") or {"type": "object"}, last_user[:200] or "x")
                arguments = orjson.dumps(args if isinstance(args, dict) else {}).decode()
                digest = hashlib.sha256(f"{name}:{arguments}:{index}".encode()).hexdigest()[:24]
                message = {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": f"call_{digest}",
                            "type": "function",
                            "function": {"name": name, "arguments": arguments},
                        }
                    ],
                }
                return message, "tool_calls", count_tokens(name + arguments) + 3
        text = self._answer(body, index, last_user)
        finish = "stop"
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_object":
            text = orjson.dumps({"answer": text}).decode()
        elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            js = fmt.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            text = orjson.dumps(_example(schema or {"type": "object"}, text)).decode()
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        for s in stops:
            if isinstance(s, str) and s and s in text:
                text = text[: text.index(s)]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if (
            isinstance(limit, int)
            and not isinstance(limit, bool)
            and limit > 0
            and count_tokens(text) > limit
        ):
            text = text[: limit * 4]
            finish = "length"
        message = {"role": "assistant", "content": text, "refusal": None}
        return message, finish, count_tokens(text)

    def _id(self, body: dict[str, Any]) -> str:
        return "chatcmpl-" + hashlib.sha256(orjson.dumps(body.get("messages"))).hexdigest()[:24]

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A complete ``chat.completion`` for the request ``body``."""
        last_user, prompt_tokens, messages = self._prompt(body)
        requested = body.get("n")
        n = requested if isinstance(requested, int) and not isinstance(requested, bool) else 1
        n = max(1, min(n, 16))
        choices, completion_tokens = [], 0
        for i in range(n):
            message, finish, tokens = self._choice_message(body, i, last_user, messages)
            completion_tokens += tokens
            choices.append(
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
            )
        return {
            "id": self._id(body),
            "object": "chat.completion",
            "created": self.created,
            "model": body.get("model") if isinstance(body.get("model"), str) else "mock",
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
        }

    def chat_chunks(
        self, body: dict[str, Any], *, words_per_chunk: int = 1
    ) -> Iterator[dict[str, Any]]:
        """The same answer as :meth:`chat`, as ``chat.completion.chunk`` objects.

        Content is split on word boundaries (each chunk keeps its leading
        space); tool-call arguments are split into pieces of 8 characters.
        A final usage chunk follows when ``stream_options.include_usage``.
        """
        full = self.chat(body)
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        base = {
            "id": full["id"],
            "object": "chat.completion.chunk",
            "created": full["created"],
            "model": full["model"],
            "service_tier": "default",
        }
        if include_usage:
            base["usage"] = None

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                **base,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }

        for choice in full["choices"]:
            i, msg = choice["index"], choice["message"]
            yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
            if msg.get("tool_calls"):
                for k, tc in enumerate(msg["tool_calls"]):
                    args = tc["function"]["arguments"]
                    yield chunk(
                        i,
                        {
                            "tool_calls": [
                                {
                                    "index": k,
                                    "id": tc["id"],
                                    "type": "function",
                                    "function": {"name": tc["function"]["name"], "arguments": ""},
                                }
                            ]
                        },
                    )
                    for j in range(0, len(args), 8):
                        yield chunk(
                            i,
                            {
                                "tool_calls": [
                                    {"index": k, "function": {"arguments": args[j : j + 8]}}
                                ]
                            },
                        )
            else:
                words = (msg.get("content") or "").split(" ")
                for j in range(0, len(words), words_per_chunk):
                    piece = " ".join(words[j : j + words_per_chunk])
                    yield chunk(i, {"content": piece if j == 0 else " " + piece})
            yield chunk(i, {}, choice["finish_reason"])
        if include_usage:
            yield {**base, "choices": [], "usage": full["usage"]}

    # -- embeddings -----------------------------------------------------------

    def embedding(self, text: str, dims: int) -> list[float]:
        """A unit vector derived from the text's hash (same text, same vector)."""
        seed = hashlib.sha256(text.encode()).digest()
        out: list[float] = []
        counter = 0
        while len(out) < dims:
            block = hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
            out.extend((b - 127.5) / 127.5 for b in block)
            counter += 1
        out = out[:dims]
        norm = math.sqrt(sum(x * x for x in out)) or 1.0
        return [x / norm for x in out]

    def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        """A ``list`` of ``embedding`` objects for ``body["input"]``."""
        raw = body.get("input")
        if isinstance(raw, str):
            inputs: list[Any] = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            inputs = [raw]
        elif isinstance(raw, list):
            inputs = raw
        else:
            inputs = [""]
        dims = body.get("dimensions")
        dims = (
            dims
            if isinstance(dims, int) and not isinstance(dims, bool) and 0 < dims <= 4096
            else (self.embedding_dims)
        )
        as_base64 = body.get("encoding_format") == "base64"
        data, tokens = [], 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else orjson.dumps(item).decode()
            tokens += (
                count_tokens(text)
                if isinstance(item, str)
                else len(item)
                if isinstance(item, list)
                else 1
            )
            vec = self.embedding(text, dims)
            emb: Any = (
                base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_base64 else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": data,
            "model": body.get("model") if isinstance(body.get("model"), str) else "mock",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
