"""Cache keys: what makes two requests the same question.

:func:`exact_key` hashes the request as it will be sent upstream (after every
earlier stage rewrote it: redacted by ``pii``, output-capped by ``budget``)
minus the fields that cannot change the answer (:data:`IGNORED`), together
with the route's deployment names, the caller's team and the policy version.
Two teams never share a key, and a new policy starts a new cache.

:func:`partition_key` is the same hash with the last user message's text left
out: the semantic cache only compares questions asked in the same partition
(team, model, system prompt, tools, parameters, earlier turns), and
:func:`last_user_text` is the text it compares.

Keys are hex SHA-256 digests: they hold no request text.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from veil import Call

__all__ = ["IGNORED", "exact_key", "last_user_text", "partition_key", "team_tag"]

IGNORED = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    }
)
"""Request fields that do not change the answer (delivery, attribution, billing)."""

_VERSION = b"veil-cache/1\x00"
_OPTS = orjson.OPT_SORT_KEYS


_heads: dict[tuple[Any, ...], bytes] = {}


def _head(call: Call) -> bytes:
    """The namespace of a call's keys (team, policy version, route), worked out
    once per team and route."""
    route = call.route
    team = call.principal.team
    version = call.policy.version
    memo = (team, version, *route.deployments) if route is not None else (team, version)
    head = _heads.get(memo)
    if head is None:
        if len(_heads) > 10_000:
            _heads.clear()
        names = ",".join(d.name for d in route.deployments) if route is not None else ""
        head = _heads[memo] = b"%s%s\x00%d\x00%s\x00" % (
            _VERSION,
            team.encode(),
            version,
            names.encode(),
        )
    return head


def _digest(call: Call, body: dict[str, Any]) -> str:
    return hashlib.sha256(_head(call) + orjson.dumps(body, option=_OPTS)).hexdigest()


def exact_key(call: Call) -> str:
    """The key of the call's request (see the module doc)."""
    request = call.request
    if IGNORED.isdisjoint(request):  # most non-streaming requests: no copy
        return _digest(call, request)
    body = request.copy()
    for k in IGNORED.intersection(request):
        del body[k]
    return _digest(call, body)


def _last_user_index(messages: Any) -> int | None:
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "user":
        return len(messages) - 1
    return None


def last_user_text(request: dict[str, Any]) -> str | None:
    """The text of the request's last message when it is a user message
    (string content, or its ``text`` parts joined); ``None`` otherwise, or
    when it holds anything but text (an image is not compared by meaning)."""
    messages = request.get("messages")
    index = _last_user_index(messages)
    if index is None or not isinstance(messages, list):
        return None
    content = messages[index].get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                return None
            text = part.get("text")
            if not isinstance(text, str):
                return None
            parts.append(text)
        return "\n".join(parts)
    return None


def partition_key(call: Call) -> str:
    """The key of everything but the last user message's text."""
    request = call.request
    body = {k: v for k, v in request.items() if k not in IGNORED}
    messages = list(body["messages"])
    last = dict(messages[-1])
    last["content"] = None
    messages[-1] = last
    body["messages"] = messages
    return _digest(call, body)


def team_tag(team: str) -> str:
    """A short, glob-safe stand-in for a team id in storage key names."""
    return hashlib.sha256(b"veil-cache-team\x00" + team.encode()).hexdigest()[:16]
