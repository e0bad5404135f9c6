"""Helpers shared by veil-cache's tests (a module with a name of its own: every
test directory of the repository has a ``conftest``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import openai

from veil.testing import ADMIN_KEY, TEST_KEY, ServerThread, _toml_value

HERE = Path(__file__).resolve().parent
PLUGIN = HERE.parent
if str(PLUGIN) not in sys.path:  # run from a source tree without installing
    sys.path.insert(0, str(PLUGIN))


def deployments(url: str) -> list[dict[str, Any]]:
    """``mock-model`` and ``other-model`` on the mock upstream (it counts requests)."""
    common = {"provider": "openai", "api_base": url + "/v1", "max_retries": 0}
    return [
        {
            "name": "mock-model",
            "model": "up-1",
            "input_per_mtok": 1.0,
            "output_per_mtok": 2.0,
            **common,
        },
        {"name": "other-model", "model": "up-2", **common},
    ]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def client(gw: ServerThread, key: str = TEST_KEY, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, **kw)


def ask(
    gw: ServerThread,
    text: str,
    *,
    key: str = TEST_KEY,
    headers: dict[str, str] | None = None,
    **params: Any,
) -> tuple[str, Any]:
    """One non-streaming call at temperature 0: (x-veil-cache header, the parsed answer)."""
    params.setdefault("temperature", 0)
    params.setdefault("model", "mock-model")
    with client(gw, key) as c:
        raw = c.chat.completions.with_raw_response.create(
            messages=user(text), extra_headers=headers, **params
        )
    return raw.headers["x-veil-cache"], raw.parse()


def ask_stream(
    gw: ServerThread, text: str, *, key: str = TEST_KEY, usage: bool = False, **params: Any
) -> tuple[str, str, list[Any]]:
    """One streaming call at temperature 0: (header, the text, every chunk)."""
    params.setdefault("temperature", 0)
    params.setdefault("model", "mock-model")
    if usage:
        params["stream_options"] = {"include_usage": True}
    with client(gw, key) as c:
        raw = c.chat.completions.with_raw_response.create(
            messages=user(text), stream=True, **params
        )
        header = raw.headers["x-veil-cache"]
        chunks = list(raw.parse())
    text_out = "".join(
        ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].delta
    )
    return header, text_out, chunks


def upstream_requests(mock: ServerThread) -> int:
    return int(mock.app.settings.stats["requests"])


def admin(gw: ServerThread, method: str, key: str = ADMIN_KEY, **params: str) -> httpx.Response:
    return httpx.request(
        method,
        gw.url + "/admin/cache",
        params=params,
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def cache_stage(gw: ServerThread) -> Any:
    """The running gateway's cache stage (to look into its store)."""
    runtime = gw.gateway.runtime
    (stage,) = [s.stage for s in runtime.stages if s.plugin == "cache"]
    return stage


def render(name: str, section: dict[str, Any]) -> str:
    """``[name]`` with nested tables (``[name.sub]``) and arrays of tables."""
    lines = ["", f"[{name}]"]
    nested = {k: v for k, v in section.items() if isinstance(v, dict)}
    arrays = {
        k: v
        for k, v in section.items()
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
    }
    for k, v in section.items():
        if k not in nested and k not in arrays:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines) + "\n"
    for k, v in nested.items():
        out += render(f"{name}.{k}", v)
    for k, rules in arrays.items():
        for rule in rules:
            out += f"\n[[{name}.{k}]]\n" + "".join(
                f"{rk} = {_toml_value(rv)}\n" for rk, rv in rule.items()
            )
    return out
