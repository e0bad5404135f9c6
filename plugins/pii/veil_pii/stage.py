"""The ``pii`` stage: redact before the upstream, restore after it.

Request path (``on_request``), for chat and embeddings calls:

1. find every text slot (:mod:`veil_pii.texts`); refuse with 400
   ``pii_unscannable`` a content part that holds no text (an image, audio,
   a file) unless the policy's ``unscanned_parts`` lets its type pass, and
   token-id embeddings input; analyse the texts off
   the event loop (:class:`~veil_pii.analysis.AnalysisPool`); if analysis
   cannot run, refuse with 503 ``pii_unavailable`` (the upstream is never
   called);
2. refuse with 400 ``pii_blocked`` if a type the policy blocks was found,
   naming the types, never the values;
3. give each value to redact a placeholder: from a per-call table, or with
   ``x-veil-conversation`` from the caller's conversation table in the
   vault (scoped to the API key and its team, :func:`conversation_scope`);
   values already in the table are also replaced where the detector missed
   them (a name found in turn 1 is still redacted in turn 5);
4. rewrite the texts: ``<PERSON_1>`` for ``redact``, ``<PERSON>`` for ``mask``.

Response path: placeholders in the answer's content, refusal and tool-call
arguments are restored (``on_response``, and chunk by chunk in
``wrap_stream`` with :class:`~veil_pii.restore.StreamRestorer`). With
``output_scan``, personal data the model produced that the request did not
contain is masked.

What other plugins see: ``call.scratch["pii"]`` holds entity counts by type
(``{"entities": {"PERSON": 2}, "placeholders": 2, "conversation": false}``)
and ``call.decisions`` a ``pii`` decision with the same counts; never values.
The placeholder table itself stays inside the stage (keyed by the call
object, not by its request id, which the client chooses; dropped when the
call ends), so no other plugin can log it by accident.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
import structlog

from veil import BadRequest, Call, GatewayError
from veil import Unavailable as VeilUnavailable
from veil.types import Chunk, Principal

from .analysis import AnalysisPool, AnalysisUnavailable
from .detector import Finding
from .placeholders import PlaceholderMap, parse_placeholder
from .restore import (
    StreamRestorer,
    json_escape,
    restore_json_arguments,
    restore_spans,
    restore_text,
)
from .settings import PART_TYPE, PiiSettings
from .texts import TextSlots, Unscannable, chat_texts, embedding_texts
from .vault import TamperedRecord, Vault, build_vault, load_key

log = structlog.get_logger("veil.pii")

__all__ = ["CONVERSATION_HEADER", "HEADER", "PiiStage", "Unavailable", "conversation_scope"]

CONVERSATION_HEADER = "x-veil-conversation"
"""Request header naming a conversation whose placeholders persist across calls."""

HEADER = "x-veil-pii"
"""Response header with what was replaced, by type: ``EMAIL_ADDRESS=1, PERSON=2``
(counts only), or ``none``."""

_CONVERSATION_ID = re.compile(r"[\x21-\x7e]{1,200}")
_SENTENCE_END = re.compile(r"[.!?\n][)\"'”’]*\s")
_MAX_UNSCANNED = 400
"""With output scanning, stream text is released per sentence, or at the
last space after this many characters when a sentence runs on."""


_WORD = re.compile(r"\w+")


@lru_cache(maxsize=8192)
def _value_pattern(value: str) -> re.Pattern[str]:
    """A value as a whole-word, case-insensitive pattern (spaces: any run of
    whitespace). Cached: a conversation's values recur every turn."""
    body = r"\s+".join(re.escape(w) for w in value.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def conversation_scope(principal: Principal) -> str:
    """Whose conversation tables a caller reaches: its team and API key.

    Conversation ids are chosen by clients and may be guessed, so a table is
    never shared beyond the key that made it: another key, even of the same
    team, that sends the same ``x-veil-conversation`` gets an empty table,
    and placeholders it sends are not restored to this key's values. (JSON,
    so that no pair of ids can spell another pair's scope.)"""
    return orjson.dumps([principal.team, principal.key_id]).decode()


class Unavailable(VeilUnavailable):
    """503 ``pii_unavailable``: the privacy step could not run; nothing was sent."""

    code = "pii_unavailable"


@dataclass(slots=True)
class CallState:
    """What the stage keeps about one call between request and response."""

    table: PlaceholderMap
    counts: dict[str, int] = field(default_factory=dict)
    known: frozenset[str] = frozenset()

    def summary(self, conversation: bool) -> dict[str, Any]:
        """What other plugins may read: counts, never values."""
        return {
            "entities": dict(self.counts),
            "placeholders": len(self.table),
            "conversation": conversation,
        }


class PiiStage:
    """Redacts personal data in requests and restores it in answers."""

    name = "pii"

    def __init__(self, settings: PiiSettings) -> None:
        self.settings = settings
        self.pool: AnalysisPool | None = None
        self.vault: Vault | None = None
        # keyed by the Call object's identity, never by its request id: the
        # client chooses that, and two calls sharing one must not share a table
        self._calls: dict[int, tuple[Call, CallState]] = {}

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the detectors (in a thread: about a second each) and open the vault."""
        if self.pool is None:
            self.pool = await asyncio.to_thread(AnalysisPool, self.settings)
        if self.vault is None:
            conv = self.settings.conversations
            key = load_key(conv.key_env, conv.store)
            redis_url = None
            if conv.store == "redis":
                import os

                redis_url = os.environ.get(conv.redis_url_env)
                if not redis_url:
                    raise ValueError(
                        f"[pii.conversations] store = 'redis' needs the Redis URL in the "
                        f"environment variable {conv.redis_url_env}"
                    )
            self.vault = build_vault(
                conv.store,
                redis_url=redis_url,
                key=key,
                ttl_s=conv.ttl_s,
                max_conversations=conv.max_conversations,
            )
            check = getattr(self.vault, "check_key", None)
            if check is not None:
                try:
                    await check()
                except TamperedRecord:
                    raise  # another replica's key: refuse to start
                except Exception as e:  # noqa: BLE001 - Redis down now: checked on first use
                    log.warning("pii_vault_key_not_checked", error=type(e).__name__)

    async def close(self) -> None:
        """Close the vault and stop the analysis threads."""
        if self.vault is not None:
            await self.vault.close()
            self.vault = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    # -- request -----------------------------------------------------------------

    async def on_request(self, call: Call) -> None:
        """Redact the call's text, or refuse it (see the module doc).

        :raises BadRequest: 400 ``pii_blocked``, ``pii_unscannable`` or
            ``invalid_conversation``.
        :raises Unavailable: 503 ``pii_unavailable``.
        """
        if call.kind == "chat":
            slots = chat_texts(call.request)
            if slots.unscanned:
                self._refuse_unscanned(call, slots)
        elif call.kind == "embeddings":
            try:
                slots = embedding_texts(call.request)
            except Unscannable as e:
                call.decide(self.name, "unscannable", part="tokens")
                raise BadRequest(str(e), code="pii_unscannable", param="input") from None
        else:
            return
        conversation = self._conversation(call)
        pool = self._pool()
        try:
            findings = await pool.analyze([slot.text for slot in slots])
        except AnalysisUnavailable as e:
            call.decide(self.name, "unavailable", reason=str(e))
            raise Unavailable(f"{e}; the request was not forwarded") from None
        self._refuse_blocked(call, findings)
        items = [
            (f.entity_type, slot.text[f.start : f.end])
            for slot, found in zip(slots, findings, strict=True)
            for f in found
            if self.settings.action(f.entity_type) == "redact"
        ]
        if conversation is not None:
            try:
                table = await self._vault().assign(
                    conversation_scope(call.principal), conversation, items
                )
            except Exception as e:  # noqa: BLE001 - any vault failure refuses the call
                call.decide(self.name, "unavailable", reason=f"vault: {type(e).__name__}")
                raise Unavailable(
                    "the conversation store is unavailable; the request was not forwarded"
                ) from None
        else:
            table = PlaceholderMap()
        findings = self._add_known_values(slots, findings, table)
        state = CallState(table)
        for slot, found in zip(slots, findings, strict=True):
            slot.set(self._rewrite(slot.text, found, table, state.counts))
        slots.commit()
        state.known = frozenset(" ".join(v.split()).casefold() for v in table.values())
        self._calls[id(call)] = (call, state)
        call.scratch[self.name] = state.summary(conversation is not None)
        call.response_headers[HEADER] = (
            ", ".join(f"{kind}={n}" for kind, n in sorted(state.counts.items())) or "none"
        )
        call.decide(self.name, "redacted" if state.counts else "clean", entities=dict(state.counts))

    def _pool(self) -> AnalysisPool:
        if self.pool is None:
            raise Unavailable(
                "personal-data analysis is not started; the request was not forwarded"
            )
        return self.pool

    def _vault(self) -> Vault:
        if self.vault is None:
            raise Unavailable("the conversation store is not started")
        return self.vault

    @staticmethod
    def _conversation(call: Call) -> str | None:
        value = call.headers.get(CONVERSATION_HEADER)
        if value is None:
            return None
        if not _CONVERSATION_ID.fullmatch(value):
            raise BadRequest(
                f"the {CONVERSATION_HEADER} header must be 1 to 200 visible ASCII characters",
                code="invalid_conversation",
            )
        return value

    def _refuse_unscanned(self, call: Call, slots: TextSlots) -> None:
        """Refuse a request with a content part that holds no text (an image,
        audio, a file) unless the policy lets its type pass unscanned."""
        allowed = self.settings.unscanned_parts
        for where, kind in slots.unscanned:
            if kind in allowed:
                continue
            # the type is the client's string: named only when it is a plain one
            plain = isinstance(kind, str) and PART_TYPE.fullmatch(kind) is not None
            call.decide(self.name, "unscannable", part=kind if plain else "other")
            what = f"a '{kind}' part" if plain else "a content part of an unknown type"
            fix = (
                ", or let the policy pass such parts unscanned "
                f'([pii] unscanned_parts = ["{kind}"])'
                if plain
                else ""
            )
            raise BadRequest(
                f"{where} is {what}, which cannot be scanned for personal data, so the request "
                f"was not forwarded; send its content as text{fix}",
                code="pii_unscannable",
                param=where,
            )

    def _refuse_blocked(self, call: Call, findings: Sequence[Sequence[Finding]]) -> None:
        blocked: dict[str, int] = {}
        for found in findings:
            for f in found:
                if self.settings.action(f.entity_type) == "block":
                    blocked[f.entity_type] = blocked.get(f.entity_type, 0) + 1
        if blocked:
            call.decide(self.name, "blocked", entities=blocked)
            call.scratch[self.name] = {"entities": blocked, "placeholders": 0, "blocked": True}
            types = ", ".join(sorted(blocked))
            raise BadRequest(
                f"the request contains personal data of a type this gateway's policy does not "
                f"allow to leave: {types}. Remove it and retry.",
                code="pii_blocked",
                param="messages" if call.kind == "chat" else "input",
            )

    def _add_known_values(
        self, slots: TextSlots, findings: list[list[Finding]], table: PlaceholderMap
    ) -> list[list[Finding]]:
        """Add the other occurrences of values the table already holds."""
        types: dict[str, str] = {}
        for placeholder, value in table.entries.items():
            parsed = parse_placeholder(placeholder)
            if parsed and len(value.strip()) >= 3 and self.settings.action(parsed[0]) == "redact":
                types[" ".join(value.split()).casefold()] = parsed[0]
        if not types:
            return findings
        # Index the values by their first word: one pass over each text's
        # words finds the candidates, a cached per-value pattern confirms.
        by_first: dict[str, list[tuple[re.Pattern[str], str]]] = {}
        others: list[tuple[re.Pattern[str], str]] = []
        for value, kind in sorted(types.items(), key=lambda item: -len(item[0])):
            first = _WORD.match(value)
            entry = (_value_pattern(value), kind)
            if first is None:
                others.append(entry)  # "+44 20 ...": starts with no word character
            else:
                by_first.setdefault(first.group(), []).append(entry)
        extended = []
        for slot, found in zip(slots, findings, strict=True):
            text = slot.text
            extra: list[Finding] = []
            candidates: list[tuple[re.Match[str], str]] = []
            for word in _WORD.finditer(text):
                for pattern, kind in by_first.get(word.group().casefold(), ()):
                    hit = pattern.match(text, word.start())
                    if hit is not None:
                        candidates.append((hit, kind))
            for pattern, kind in others:
                candidates += [(hit, kind) for hit in pattern.finditer(text)]
            for hit, kind in candidates:
                taken = found + extra
                if not any(f.start < hit.end() and hit.start() < f.end for f in taken):
                    extra.append(Finding(hit.start(), hit.end(), kind, 1.0))
            extended.append(sorted([*found, *extra], key=lambda f: f.start) if extra else found)
        return extended

    def _rewrite(
        self, text: str, findings: Iterable[Finding], table: PlaceholderMap, counts: dict[str, int]
    ) -> str:
        out: list[str] = []
        pos = 0
        for f in findings:
            action = self.settings.action(f.entity_type)
            if action == "allow" or f.start < pos:
                continue
            out.append(text[pos : f.start])
            if action == "mask":
                out.append(f"<{f.entity_type}>")
            else:
                out.append(table.assign(f.entity_type, text[f.start : f.end]))
            counts[f.entity_type] = counts.get(f.entity_type, 0) + 1
            pos = f.end
        if not out:
            return text
        out.append(text[pos:])
        return "".join(out)

    # -- response ----------------------------------------------------------------

    async def on_response(self, call: Call) -> None:
        """Restore placeholders in a complete answer; mask new personal data
        when ``output_scan`` is on."""
        state = self._take(call)
        response = call.response
        if state is None or call.kind != "chat" or response is None or call.stream:
            return
        for choice in response.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                continue
            for key in ("content", "refusal"):
                if isinstance(message.get(key), str):
                    if self.settings.output_scan:
                        restored = restore_text(message[key], state.table)
                        restored = await self._scan_output(call, state, restored)
                    else:
                        restored = self._restore_and_remember(message[key], state)
                    message[key] = restored
            for tool_call in message.get("tool_calls") or ():
                function = tool_call.get("function") if isinstance(tool_call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    function["arguments"] = restore_json_arguments(
                        function["arguments"], state.table
                    )
            function_call = message.get("function_call")
            if isinstance(function_call, dict) and isinstance(function_call.get("arguments"), str):
                function_call["arguments"] = restore_json_arguments(
                    function_call["arguments"], state.table
                )

    def _restore_and_remember(self, text: str, state: CallState) -> str:
        """Restore an answer and cache its analysis: the client will resend
        it as history, and its personal values are the ones restored here."""
        restored, spans = restore_spans(text, state.table)
        if self.pool is not None:
            self.pool.remember(restored, [Finding(a, b, kind, 1.0) for a, b, kind in spans])
        return restored

    async def _scan_output(self, call: Call, state: CallState, text: str) -> str:
        """Mask personal data in ``text`` that the request did not contain."""
        if not text.strip():
            return text
        try:
            (findings,) = await self._pool().analyze([text])
        except AnalysisUnavailable as e:
            call.decide(self.name, "unavailable", reason=str(e))
            raise Unavailable(f"{e}; the answer was withheld") from None
        out: list[str] = []
        pos = 0
        masked: dict[str, int] = {}
        for f in findings:
            value = " ".join(text[f.start : f.end].split()).casefold()
            if self.settings.action(f.entity_type) == "allow" or value in state.known:
                continue
            if any(value in known or known in value for known in state.known if len(known) > 2):
                continue
            out += [text[pos : f.start], f"<{f.entity_type}>"]
            masked[f.entity_type] = masked.get(f.entity_type, 0) + 1
            pos = f.end
        if not masked:
            return text
        call.decide(self.name, "output_masked", entities=masked)
        return "".join(out) + text[pos:]

    async def on_error(self, call: Call, error: GatewayError) -> None:
        """Forget the call's table."""
        self._take(call)

    def _state(self, call: Call) -> CallState | None:
        """``call``'s state (``None``: it has none)."""
        entry = self._calls.get(id(call))
        return entry[1] if entry is not None and entry[0] is call else None

    def _take(self, call: Call) -> CallState | None:
        """Remove and return ``call``'s state (``None``: it has none)."""
        state = self._state(call)
        if state is not None:
            del self._calls[id(call)]
        return state

    def wrap_stream(self, call: Call, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """Restore placeholders chunk by chunk (and scan per sentence with
        ``output_scan``); a chat stream without redactions passes through."""
        state = self._state(call)
        if state is None or call.kind != "chat":
            return chunks
        if not len(state.table) and not self.settings.output_scan:
            return chunks
        return _StreamRestoration(self, call, state).run(chunks)


class _StreamRestoration:
    """Per-stream state: one restorer per choice's content and refusal, and
    per tool call's arguments."""

    def __init__(self, stage: PiiStage, call: Call, state: CallState) -> None:
        self.stage = stage
        self.call = call
        self.state = state
        self.text: dict[tuple[int, str], StreamRestorer] = {}
        self.tools: dict[tuple[int, int], StreamRestorer] = {}
        self.unscanned: dict[tuple[int, str], str] = {}
        self.raw: dict[int, list[str]] = {}
        self.last: Chunk | None = None

    def _restorer(self, key: tuple[int, str]) -> StreamRestorer:
        found = self.text.get(key)
        if found is None:
            found = self.text[key] = StreamRestorer(self.state.table)
        return found

    def _tool_restorer(self, key: tuple[int, int]) -> StreamRestorer:
        found = self.tools.get(key)
        if found is None:
            found = self.tools[key] = StreamRestorer(self.state.table, escape=json_escape)
        return found

    async def _release(self, key: tuple[int, str], text: str, final: bool) -> str:
        """With output scanning, hold text until a sentence ends, then scan it."""
        if not self.stage.settings.output_scan:
            return text
        pending = self.unscanned.get(key, "") + text
        if final:
            cut = len(pending)
        else:
            ends = list(_SENTENCE_END.finditer(pending))
            cut = ends[-1].end() if ends else 0
            if not cut and len(pending) > _MAX_UNSCANNED:
                cut = pending.rfind(" ", 0, len(pending) - 40) + 1
        self.unscanned[key] = pending[cut:]
        if cut <= 0:
            return ""
        return await self.stage._scan_output(self.call, self.state, pending[:cut])

    async def run(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        async for chunk in chunks:
            self.last = chunk
            for choice in chunk.get("choices") or ():
                if isinstance(choice, dict):
                    await self._choice(choice)
            yield chunk
        tail = await self._flush_all()
        if tail is not None:
            yield tail

    async def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        finishing = choice.get("finish_reason") is not None
        for field_name in ("content", "refusal"):
            key = (index, field_name)
            value = delta.get(field_name)
            if field_name == "content" and isinstance(value, str):
                self.raw.setdefault(index, []).append(value)
            if isinstance(value, str) or (finishing and key in self.text):
                restorer = self._restorer(key)
                out = restorer.feed(value) if isinstance(value, str) else ""
                if finishing:
                    out += restorer.flush()
                    del self.text[key]
                released = await self._release(key, out, finishing)
                if isinstance(value, str) or released:
                    delta[field_name] = released
        for tool_call in delta.get("tool_calls") or ():
            function = tool_call.get("function") if isinstance(tool_call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                key2 = (index, tool_call.get("index", 0))
                function["arguments"] = self._tool_restorer(key2).feed(function["arguments"])
        if finishing:
            self._flush_tools(index, delta)
            raw = self.raw.pop(index, None)
            if raw and not self.stage.settings.output_scan:
                self.stage._restore_and_remember("".join(raw), self.state)

    def _flush_tools(self, index: int, delta: dict[str, Any]) -> None:
        for key in sorted(k for k in self.tools if k[0] == index):
            held = self.tools.pop(key).flush()
            if not held:
                continue
            calls = delta.setdefault("tool_calls", [])
            for tool_call in calls:
                if tool_call.get("index", 0) == key[1]:
                    function = tool_call.setdefault("function", {})
                    function["arguments"] = function.get("arguments", "") + held
                    break
            else:
                calls.append({"index": key[1], "function": {"arguments": held}})

    async def _flush_all(self) -> Chunk | None:
        """Text still held when the stream ended without a finish chunk."""
        if self.last is None or not (self.text or self.tools or any(self.unscanned.values())):
            return None
        deltas: dict[int, dict[str, Any]] = {}
        for key in list(self.text):
            out = await self._release(key, self.text.pop(key).flush(), True)
            if out:
                deltas.setdefault(key[0], {})[key[1]] = out
        for key in [k for k, pending in self.unscanned.items() if pending]:
            out = await self._release(key, "", True)
            if out:
                deltas.setdefault(key[0], {})[key[1]] = out
        for index in {k[0] for k in self.tools}:
            self._flush_tools(index, deltas.setdefault(index, {}))
        if not any(deltas.values()):
            return None
        base = {k: v for k, v in self.last.items() if k in {"id", "object", "created", "model"}}
        return {
            **base,
            "choices": [
                {"index": i, "delta": d, "finish_reason": None} for i, d in sorted(deltas.items())
            ],
        }
