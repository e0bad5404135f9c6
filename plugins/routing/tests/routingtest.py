"""Shared helpers of veil-routing's tests: policies with a ``[routing]`` section,
mock upstreams with failure injection, a stage that keeps each call's
decisions, and the ``openai`` SDK to call the gateway."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import openai

from veil import hookimpl
from veil.mock.server import MockSettings, MockUpstream
from veil.testing import TEST_KEY, ServerThread, _toml_value, free_port, policy_toml
from veil.types import Call

TAGGED_KEY = "sk-veil-test-tagged"
"""An API key of team ``test`` with tags ``batch`` and ``eu``."""


def tagged_key_toml() -> str:
    sha = hashlib.sha256(TAGGED_KEY.encode()).hexdigest()
    return f'\n[[keys]]\nid = "tagged"\nteam = "test"\nsha256 = "{sha}"\ntags = ["batch", "eu"]\n'


def mock_dep(name: str, model: str | None = None, **kw: Any) -> dict[str, Any]:
    """An in-process ``mock`` deployment (answers with ``model`` as its model id)."""
    return {"name": name, "provider": "mock", "model": model or f"up-{name}", **kw}


def http_dep(name: str, url: str, model: str | None = None, **kw: Any) -> dict[str, Any]:
    """A deployment on an OpenAI-compatible server at ``url`` (a mock upstream),
    without retries so that each failure moves to the next deployment."""
    kw.setdefault("max_retries", 0)
    return {
        "name": name,
        "provider": "openai",
        "model": model or f"up-{name}",
        "api_base": url + "/v1",
        **kw,
    }


def dead_url() -> str:
    """A URL on which nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


def render_routing(section: Mapping[str, Any]) -> str:
    """``[routing]`` with nested tables (aliases, pools, models, breaker, ...)
    and ``[[routing.rules]]``."""
    lines = ["", "[routing]"]
    tables: list[tuple[str, Mapping[str, Any]]] = []
    rules: Sequence[Mapping[str, Any]] = ()
    for k, v in section.items():
        if k == "rules":
            rules = v
        elif k in ("aliases", "pools", "models"):
            for name, sub in v.items():
                tables.append((f'{k}."{name}"', sub))
        elif isinstance(v, dict) and k not in ("team_strategies", "model_balance"):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, sub in tables:
        lines += ["", f"[routing.{name}]"]
        nested = {k: v for k, v in sub.items() if isinstance(v, dict) and k != "metadata"}
        lines += [f"{k} = {_toml_value(v)}" for k, v in sub.items() if k not in nested]
        for k, v in nested.items():
            lines += ["", f"[routing.{name}.{k}]"] + [
                f'"{a}" = {_toml_value(b)}' for a, b in v.items()
            ]
    for rule in rules:
        lines += ["", "[[routing.rules]]"] + [f"{k} = {_toml_value(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"


def routing_policy(
    deployments: Sequence[Mapping[str, Any]],
    routing: Mapping[str, Any],
    *,
    version: int = 1,
    pipeline: Sequence[str] = ("routing", "recorder"),
    extra: str = "",
) -> str:
    """A policy running ``routing`` (and the decision recorder) over ``deployments``."""
    return (
        policy_toml(version=version, pipeline=list(pipeline), deployments=list(deployments))
        + tagged_key_toml()
        + render_routing(routing)
        + extra
    )


class Recorder:
    """A real (tiny) plugin: its stage keeps the decisions of every finished call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        recorder = self

        class _Stage:
            name = "recorder"

            async def on_finish(self, call: Call) -> None:
                recorder.calls.append(call)

        self._stage = _Stage()

    @hookimpl
    def veil_register_stages(self, register: Any, settings: Any) -> None:
        register(self._stage)

    def routing_decisions(self) -> list[dict[str, Any]]:
        """``call.decide("routing", ...)`` records, as dicts with ``action``."""
        out = []
        for call in self.calls:
            for d in call.decisions:
                if d.stage == "routing":
                    out.append({"action": d.action, **d.detail})
        return out


_CLIENTS: dict[tuple[str, str], openai.OpenAI] = {}


def client(gw: ServerThread, key: str = TEST_KEY) -> openai.OpenAI:
    """An ``openai`` client for the gateway (one per gateway and key, closed
    after each test by the ``close_clients`` fixture)."""
    found = _CLIENTS.get((gw.url, key))
    if found is None:
        found = _CLIENTS[(gw.url, key)] = openai.OpenAI(
            base_url=gw.url + "/v1", api_key=key, max_retries=0
        )
    return found


def close_clients() -> None:
    """Close every client :func:`client` made."""
    for c in _CLIENTS.values():
        c.close()
    _CLIENTS.clear()


def chat(
    gw: ServerThread,
    model: str,
    text: str = "hello",
    *,
    key: str = TEST_KEY,
    headers: Mapping[str, str] | None = None,
    **kw: Any,
) -> tuple[Any, Mapping[str, str]]:
    """One chat call; returns the parsed completion and the response headers."""
    raw = client(gw, key).chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        extra_headers=dict(headers or {}),
        **kw,
    )
    return raw.parse(), raw.headers


@contextlib.contextmanager
def mock_server(**settings: Any) -> Iterator[ServerThread]:
    """A ``veil mock-upstream`` with these :class:`MockSettings`."""
    with ServerThread(MockUpstream(MockSettings(**settings))) as server:
        yield server


def start_error(kit: Any, path: Any, plugins: Mapping[str, Any]) -> Exception:
    """The error the gateway's start-up raises for the policy at ``path``
    (fails the test if it starts)."""
    import asyncio

    from veil.gateway import Gateway

    gateway = Gateway(kit.config(path, extra_plugins=dict(plugins)))

    async def attempt() -> Exception | None:
        try:
            await gateway.start()
        except Exception as e:  # noqa: BLE001 - returned to the test
            return e
        await gateway.stop()
        return None

    error = asyncio.run(attempt())
    assert error is not None, "the gateway started"
    return error


class HalfStream:
    """An upstream (ASGI) that accepts a streaming call, sends one chunk, then
    an error event: a stream that breaks half-way. Counts its requests."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        while (await receive()).get("more_body"):
            pass
        self.requests += 1
        chunk = (
            b'data: {"id": "c1", "object": "chat.completion.chunk", "created": 0, '
            b'"model": "half", "choices": [{"index": 0, "delta": {"role": "assistant", '
            b'"content": "Hel"}, "finish_reason": null}]}\n\n'
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        error = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
        await send({"type": "http.response.body", "body": error, "more_body": False})


def metric_value(gw: ServerThread, name: str, **labels: str) -> float | None:
    """A sample's value from the gateway's ``/metrics`` (``None`` if absent)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(gw.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None
