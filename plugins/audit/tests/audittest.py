"""Helpers shared by veil-audit's tests (a module with a name of its own:
every test directory of the repository has a ``conftest``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from veil import Call, hookimpl
from veil.testing import ServerThread, _toml_value

HERE = Path(__file__).resolve().parent
PLUGIN = HERE.parent
if str(PLUGIN) not in sys.path:  # run from a source tree without installing
    sys.path.insert(0, str(PLUGIN))

KEY = "test-audit-key-0123456789abcdef"
"""The HMAC key the tests' gateways write with (``VEIL_AUDIT_HMAC_KEY``)."""

FIELDS = {
    "seq", "prev", "mac", "event", "timestamp", "request_id", "started_at", "kind", "stream",
    "principal", "policy", "plugins", "model", "deployment", "provider", "upstream_model",
    "route", "attempts", "failovers", "answered_by", "cache", "tokens_in", "tokens_out",
    "tokens_cached", "cost_usd", "pii", "budget", "decisions", "status", "error", "latency_ms",
}  # fmt: skip
"""Every field of a call record."""


def lines(directory: Path) -> Iterator[dict[str, Any]]:
    """Every record of the directory's files, in chain order."""
    from veil_audit.files import chain_files, read_records_bytes

    for path in chain_files(directory):
        for line in read_records_bytes(path).splitlines():
            yield orjson.loads(line)


def calls(directory: Path) -> list[dict[str, Any]]:
    """The ``call`` records of the directory."""
    return [r for r in lines(directory) if r["event"] == "call"]


def by_request(directory: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in calls(directory):
        out.setdefault(r["request_id"], []).append(r)
    return out


def upstream(url: str, name: str = "mock-model", **extra: Any) -> dict[str, Any]:
    """A deployment on a ``veil mock-upstream`` at ``url``."""
    return {
        "name": name,
        "provider": "openai",
        "model": "upstream-1",
        "api_base": url + "/v1",
        "max_retries": 0,
        "input_per_mtok": 2.0,
        "output_per_mtok": 8.0,
        **extra,
    }


class CacheStage:
    """What a cache hit looks like to audit, until veil-cache exists: a stage
    named ``cache`` that answers a repeated question itself (``call.response``
    in ``on_request``) and records ``hit`` or ``miss``."""

    name = "cache"

    def __init__(self) -> None:
        self.store: dict[bytes, dict[str, Any]] = {}

    async def on_request(self, call: Call) -> None:
        key = orjson.dumps([call.request.get("model"), call.request.get("messages")])
        found = self.store.get(key)
        if found is not None:
            call.response = found
            call.decide(self.name, "hit")
            return
        call.decide(self.name, "miss")
        call.scratch[self.name] = key

    async def on_response(self, call: Call) -> None:
        key = call.scratch.get(self.name)
        if key is not None and call.response is not None and not call.stream:
            self.store[key] = call.response


class CachePlugin:
    __version__ = "0.0.1"

    @hookimpl
    def veil_register_stages(self, register: Any) -> None:
        register(CacheStage())


def section(name: str, values: dict[str, Any]) -> str:
    """``[name]`` with its values, and ``[[name.x]]`` tables for lists of dicts."""
    lines = ["", f"[{name}]"]
    tables = {
        k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)
    }
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if k not in tables]
    for key, rows in tables.items():
        for row in rows:
            lines += ["", f"[[{name}.{key}]]"] + [f"{k} = {_toml_value(v)}" for k, v in row.items()]
    return "\n".join(lines) + "\n"


class AuditGateway:
    """A started gateway and its audit directory."""

    def __init__(self, server: ServerThread, directory: Path) -> None:
        self.server = server
        self.url = server.url
        self.directory = directory

    def client(self, **kw: Any) -> Any:
        import openai

        from veil.testing import TEST_KEY

        kw.setdefault("api_key", TEST_KEY)
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, **kw)
