"""What one audit record says about a call: building it from a :class:`~veil.Call`.

The record holds ids, names the policy defines, counts, amounts and times;
never prompt or answer text, personal values, API keys or error messages
(which could quote input). Strings that come from a request are recorded
only when the policy defines them (a model name it lists), else replaced by
a fixed marker; the request's ``user`` field is pseudonymized by default.
See the README's "Record fields" for every field.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from veil import Call
from veil.errors import StageFailed

from .chain import Mac

__all__ = ["UNKNOWN_MODEL", "CallFacts", "RuntimeFacts", "build_record", "cache_status"]

UNKNOWN_MODEL = "(not in policy)"
"""Recorded instead of a requested model name the policy does not list
(a name a client invented is free text)."""

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
_ENTITY = re.compile(r"[A-Z][A-Z0-9_]{0,47}")
CACHE_ACTIONS = frozenset({"hit", "miss", "stored", "bypass"})


class RuntimeFacts:
    """What every record of one policy load shares, computed once: the
    policy's identity and the plugins (and versions) that run."""

    __slots__ = ("plugins", "policy", "pseudonyms", "user_ids")

    def __init__(
        self,
        policy: Any,
        versions: Mapping[str, str | None],
        pseudonym_key: Mac | None,
        user_ids: str,
    ) -> None:
        self.policy = {
            "version": policy.version,
            "sha256": policy.digest,
            "signed_by": getattr(policy, "signed_by", None),
            "issuer": policy.issuer,
        }
        self.plugins = {name: versions.get(name) for name in policy.plugins}
        self.pseudonyms = pseudonym_key
        self.user_ids = user_ids

    def user(self, user: str | None) -> str | None:
        if user is None or self.user_ids == "omit":
            return None
        if self.user_ids == "clear" or self.pseudonyms is None:
            return user
        return "u-" + self.pseudonyms.hex(b"user:" + user.encode())[:20]


class CallFacts:
    """Facts derived from a call's decisions (see :func:`build_record`)."""

    __slots__ = ("budget", "cache", "decisions", "pii", "pii_scanned")

    def __init__(self, call: Call) -> None:
        pii: dict[str, dict[str, int]] = {}
        budget: dict[str, Any] | None = None
        cache: str | None = None
        pairs: list[str] = []
        scanned = False
        for d in call.decisions:
            stage, action = d.stage, d.action
            pairs.append(f"{_name(stage)}:{_name(action)}")
            detail = d.detail
            entities = detail.get("entities") if detail else None
            if isinstance(entities, Mapping):
                slot_action = _name(action)
                for kind, n in entities.items():
                    if isinstance(kind, str) and isinstance(n, int) and _ENTITY.fullmatch(kind):
                        per = pii.setdefault(kind, {})
                        per[slot_action] = per.get(slot_action, 0) + n
            if stage == "pii" and action in ("redacted", "clean", "blocked"):
                scanned = scanned or action != "blocked"
            elif stage == "budget":
                budget = {"action": _name(action)}
                for k in ("reason", "usd", "reserved_usd"):
                    v = detail.get(k)
                    if isinstance(v, int | float) or (isinstance(v, str) and _NAME.fullmatch(v)):
                        budget[k] = v
            elif stage == "cache" and action in CACHE_ACTIONS:
                cache = action
        if cache is None and call.answered_by == "cache":
            cache = "hit"
        self.pii = pii
        self.budget = budget
        self.cache = cache
        self.decisions = pairs
        self.pii_scanned = scanned


class _NoFacts:
    __slots__ = ()
    budget = None
    cache = None
    decisions: list[str] = []
    pii: dict[str, dict[str, int]] = {}
    pii_scanned = False


_NO_FACTS: Any = _NoFacts()


def cache_status(call: Call) -> str | None:
    """``hit``, ``miss``, ``stored``, ``bypass`` or ``None`` (no cache stage)."""
    return CallFacts(call).cache


def _name(value: object) -> str:
    s = str(value)
    return s if _NAME.fullmatch(s) else "(other)"


def _model(call: Call) -> str:
    requested = call.request.get("model")
    if isinstance(requested, str) and requested in call.policy.models:
        return requested
    return UNKNOWN_MODEL


_seconds: dict[int, str] = {}


def _iso(t: float) -> str:
    """UTC ISO 8601 with microseconds (formatted seconds are cached)."""
    s = int(t)
    text = _seconds.get(s)
    if text is None:
        if len(_seconds) > 256:
            _seconds.clear()
        text = _seconds[s] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
    return text + "." + str(int((t - s) * 1e6)).zfill(6) + "Z"  # cheaper than a format spec


def _places(x: float, scale: float) -> float:
    """``x`` (not negative) rounded to ``1/scale``: what ``round(x, n)`` gives, at a
    third of its cost (``round`` with digits goes through decimal conversion)."""
    return int(x * scale + 0.5) / scale


def build_record(
    call: Call, facts: RuntimeFacts, *, prompts: bool = False, now: float | None = None
) -> dict[str, Any]:
    """The record of a finished call (``call.error`` set when it failed).

    :param prompts: add the request's messages as the upstream saw them
        (the caller checks that the ``pii`` stage scanned this call).
    """
    end = time.perf_counter()
    total = end - call.started
    upstream = call.upstream_seconds
    dep = call.deployment
    # tokens the upstream spent: a call a stage answered (a cache hit) spent none,
    # whatever usage its replayed answer carries
    usage = call.usage if call.answered_by is None else None
    error = call.error
    derived = CallFacts(call) if call.decisions or call.answered_by else _NO_FACTS
    p = call.principal
    record: dict[str, Any] = {
        "event": "call",
        "timestamp": _iso(now if now is not None else time.time()),
        "request_id": call.id,
        "started_at": _iso(call.started_at),
        "kind": call.kind,
        "stream": call.stream,
        "principal": {"key_id": p.key_id, "team": p.team, "user": facts.user(p.user)},
        "policy": facts.policy,
        "plugins": facts.plugins,
        "model": _model(call),
        "deployment": dep.name if dep is not None else None,
        "provider": dep.provider if dep is not None else None,
        "upstream_model": dep.model if dep is not None else None,
        "route": call.route.reason if call.route is not None else None,
        "attempts": call.attempts,
        "failovers": call.failovers,
        "answered_by": call.answered_by,
        "cache": derived.cache,
        "tokens_in": usage.prompt_tokens if usage is not None else 0,
        "tokens_out": usage.completion_tokens if usage is not None else 0,
        "tokens_cached": usage.cached_tokens if usage is not None else 0,
        "cost_usd": _places(dep.cost(usage), 1e9) if dep is not None and usage is not None else 0.0,
        "pii": dict(derived.pii),
        "budget": derived.budget,
        "decisions": list(derived.decisions),
        "status": 200 if error is None else error.status,
        "error": None
        if error is None
        else {
            "type": error.type,
            "code": _name(error.code) if error.code is not None else None,
            "stage": error.stage if isinstance(error, StageFailed) else None,
        },
        "latency_ms": {
            "total": _places(total * 1000, 1e3),
            "upstream": _places(upstream * 1000, 1e3),
            "gateway": _places(max(0.0, total - upstream) * 1000, 1e3),
        },
    }
    if prompts and derived.pii_scanned:
        record["redacted_messages"] = call.request.get("messages") or call.request.get("input")
    return record
