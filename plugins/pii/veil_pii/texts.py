"""Where the text of a request lives, and how to write it back.

:func:`chat_texts` finds every string of an OpenAI chat request that may
carry personal data: message ``content`` (strings and ``text`` parts) of
every role, participant ``name``, assistant ``tool_calls`` and
``function_call`` arguments, ``refusal`` (a message's, and ``refusal``
parts), the predicted output (``prediction.content``), and the strings of
every other field but those that carry no free text (:data:`_CHAT_NOT_TEXT`:
numbers, enums, ids, tool and schema definitions), so ``user``, ``metadata``,
``stop`` and fields veil does not know are scanned too. Content parts that hold no text (images,
audio, files, or any other type) cannot be scanned: they are listed in
:attr:`TextSlots.unscanned`, for the caller to refuse or let pass. Tool
call arguments are JSON documents in a string: their string values are
slots of their own, and the document is written back as valid JSON (only
when a value changed, so untouched arguments keep their exact bytes). Tool
results (``role: tool``) that hold JSON are treated the same way.

:func:`embedding_texts` does the same for an embeddings request's ``input``
(and its other fields but ``model``, ``encoding_format`` and ``dimensions``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping, MutableSequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Slot", "TextSlots", "Unscannable", "chat_texts", "embedding_texts"]


class Unscannable(ValueError):
    """The request carries input that cannot be scanned (e.g. token ids)."""


@dataclass(slots=True)
class Slot:
    """One string in the request: ``container[key]``."""

    container: MutableMapping[str, Any] | MutableSequence[Any]
    key: Any

    @property
    def text(self) -> str:
        value = self.container[self.key]
        assert isinstance(value, str)
        return value

    def set(self, value: str) -> None:
        self.container[self.key] = value


@dataclass(slots=True)
class TextSlots:
    """The slots of a request and the JSON documents to write back after
    the slots changed (:meth:`commit`)."""

    slots: list[Slot] = field(default_factory=list)
    _documents: list[tuple[Slot, Any, str]] = field(default_factory=list)
    unscanned: list[tuple[str, Any]] = field(default_factory=list)
    """Content parts that hold no text to scan: (where, e.g.
    ``messages[0].content[1]``, and the part's ``type`` as sent)."""

    def add(self, container: Any, key: Any) -> None:
        if isinstance(container[key], str) and container[key]:
            self.slots.append(Slot(container, key))

    def add_json(self, container: Any, key: Any) -> None:
        """Add the string values of the JSON document ``container[key]``;
        if it is not a JSON object or array, its whole text is one slot."""
        raw = container[key]
        if not isinstance(raw, str) or not raw:
            return
        try:
            document = json.loads(raw)
        except ValueError:
            self.add(container, key)
            return
        if not isinstance(document, (dict, list)):
            self.add(container, key)
            return
        before = len(self.slots)
        wrapper = [document]
        for holder, k in _json_strings(wrapper, 0):
            self.add(holder, k)
        if len(self.slots) > before:
            self._documents.append((Slot(container, key), wrapper, raw))

    def commit(self) -> None:
        """Write back the JSON documents whose values changed."""
        for slot, wrapper, raw in self._documents:
            encoded = json.dumps(wrapper[0], ensure_ascii=False)
            if json.loads(raw) != wrapper[0]:
                slot.set(encoded)

    def __iter__(self) -> Iterator[Slot]:
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)


def _json_strings(holder: Any, key: Any) -> Iterator[tuple[Any, Any]]:
    value = holder[key]
    if isinstance(value, str):
        yield holder, key
    elif isinstance(value, dict):
        for k in list(value):
            yield from _json_strings(value, k)
    elif isinstance(value, list):
        for i in range(len(value)):
            yield from _json_strings(value, i)


def _parts(found: TextSlots, content: Any, where: str, i: int | None = None) -> None:
    """The text of ``text`` and ``refusal`` parts; every other part is
    unscanned (at ``where``, formatted with ``i`` when given)."""
    if not isinstance(content, list):
        return
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        key = "text" if kind == "text" else "refusal" if kind == "refusal" else None
        if key is None:
            found.unscanned.append(((where % i if i is not None else where) + f"[{j}]", kind))
        elif isinstance(part.get(key), str):
            found.add(part, key)


def chat_texts(request: dict[str, Any]) -> TextSlots:
    """The slots of a chat completion request (see the module doc)."""
    found = TextSlots()
    messages = request.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            if message.get("role") in {"tool", "function"}:
                found.add_json(message, "content")
            else:
                found.add(message, "content")
        else:
            _parts(found, content, "messages[%d].content", i)
        for key in ("name", "refusal"):
            if isinstance(message.get(key), str):
                found.add(message, key)
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                found.add_json(function, "arguments")
        function_call = message.get("function_call")
        if isinstance(function_call, dict):
            found.add_json(function_call, "arguments")
    skip = _CHAT_NOT_TEXT
    prediction = request.get("prediction")
    if isinstance(prediction, dict) and isinstance(prediction.get("content"), list):
        _parts(found, prediction["content"], "prediction.content")
        _other_fields(found, prediction, _CONTENT)
        skip = _CHAT_NOT_TEXT_NOR_PREDICTION
    _other_fields(found, request, skip)  # each string once: a slot is rewritten once
    return found


_CHAT_NOT_TEXT = frozenset(
    {
        "messages",  # scanned above
        "model",
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "modalities",
        "n",
        "parallel_tool_calls",
        "presence_penalty",
        "reasoning_effort",
        "response_format",
        "seed",
        "service_tier",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "verbosity",
    }
)
"""Chat request fields that carry no free text: numbers, enums, ids, and the
tool and schema definitions the application's developers wrote. Every other
field's strings are scanned: ``user``, ``metadata``, ``stop``,
``safety_identifier``, ``prompt_cache_key``, ``web_search_options``, and
fields veil does not know (a parameter added to the API after this list
must not carry text out unscanned)."""

_CHAT_NOT_TEXT_NOR_PREDICTION = _CHAT_NOT_TEXT | {"prediction"}
_CONTENT = frozenset({"content"})
_EMBEDDINGS_NOT_TEXT = frozenset({"input", "model", "encoding_format", "dimensions"})


def _other_fields(found: TextSlots, holder: dict[str, Any], skip: frozenset[str]) -> None:
    """Every string in ``holder``'s fields not in ``skip``, however nested."""
    for key in holder:
        if key not in skip:
            for container, k in _json_strings(holder, key):
                found.add(container, k)


def embedding_texts(request: dict[str, Any]) -> TextSlots:
    """The slots of an embeddings request: ``input`` and the strings of
    its other fields but ``model``, ``encoding_format`` and ``dimensions``.

    :raises Unscannable: the input is token ids, which cannot be analysed.
    """
    found = TextSlots()
    value = request.get("input")
    if isinstance(value, str):
        found.add(request, "input")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str):
                found.add(value, i)
            else:
                raise Unscannable("token-id input cannot be scanned for personal data")
    _other_fields(found, request, _EMBEDDINGS_NOT_TEXT)
    return found
