"""Helpers shared by veil-pii's tests (a module with a name of its own: every
test directory of the repository has a ``conftest``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import openai

from veil.testing import TEST_KEY, ServerThread

HERE = Path(__file__).resolve().parent
PLUGIN = HERE.parent
if str(PLUGIN) not in sys.path:  # run from a source tree without installing
    sys.path.insert(0, str(PLUGIN))

SHARED_DEV = PLUGIN.parent.parent.parent / "shared" / "data" / "pii" / "dev.jsonl"
SAMPLE = HERE / "data" / "pii_sample.jsonl"


def labelled_data() -> Path:
    """The full dev set when ``../shared`` exists, else the vendored sample."""
    return SHARED_DEV if SHARED_DEV.is_file() else SAMPLE


def upstream_deployments(url: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "mock-model",
            "provider": "openai",
            "model": "upstream-1",
            "api_base": url + "/v1",
            "max_retries": 0,
        },
        {
            "name": "mock-embed",
            "provider": "openai",
            "model": "upstream-embed",
            "api_base": url + "/v1",
        },
    ]


class PiiGateway:
    """A started gateway, its upstream, and helpers to read what the upstream got."""

    def __init__(self, gateway: ServerThread, upstream: ServerThread) -> None:
        self.gateway = gateway
        self.upstream = upstream
        self.upstream.app.settings.record = True

    def client(self, key: str = TEST_KEY, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key=key, max_retries=0, **kw)

    @property
    def received(self) -> list[dict[str, Any]]:
        """Every body the upstream received, parsed."""
        return [json.loads(raw) for raw in self.upstream.app.settings.received]

    def received_text(self) -> str:
        """Everything the upstream received, as one string (JSON unescaped)."""
        return "\n".join(json.dumps(body, ensure_ascii=False) for body in self.received)

    def clear(self) -> None:
        self.upstream.app.settings.received.clear()

    @property
    def upstream_requests(self) -> int:
        return int(self.upstream.app.settings.stats["requests"])
