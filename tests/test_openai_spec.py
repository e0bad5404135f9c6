"""Every JSON body the gateway returns validates against OpenAI's own
OpenAPI document (the vendored subset in tests/spec/)."""

from __future__ import annotations

import httpx
import orjson
import pytest
from openai_schema import validate

from veil.testing import ADMIN_KEY, TEST_KEY, ServerThread

AUTH = {"authorization": f"Bearer {TEST_KEY}"}
MSG = [{"role": "user", "content": "hello spec"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
            },
        },
    }
]


def _post(gw: ServerThread, path: str, body: object) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers=AUTH, timeout=10)


def _sse(r: httpx.Response) -> list[dict]:
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"n": 2},
        {"tools": TOOLS},
        {"response_format": {"type": "json_object"}},
        {"max_tokens": 2},
    ],
    ids=["plain", "n2", "tools", "json", "length"],
)
def test_chat_completion_bodies_match_the_spec(any_gateway: ServerThread, extra: dict) -> None:
    r = _post(
        any_gateway, "/v1/chat/completions", {"model": "mock-model", "messages": MSG, **extra}
    )
    assert r.status_code == 200
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    for choice in body["choices"]:
        assert "logprobs" in choice and choice["logprobs"] is None
        assert "refusal" in choice["message"]
    assert isinstance(body["created"], int)
    assert body.get("system_fingerprint", "") is not None


@pytest.mark.parametrize("usage", [True, False])
@pytest.mark.parametrize("extra", [{}, {"tools": TOOLS}], ids=["text", "tools"])
def test_stream_chunks_match_the_spec(any_gateway: ServerThread, usage: bool, extra: dict) -> None:
    body = {"model": "mock-model", "messages": MSG, "stream": True, **extra}
    if usage:
        body["stream_options"] = {"include_usage": True}
    chunks = _sse(_post(any_gateway, "/v1/chat/completions", body))
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert isinstance(chunk["created"], int)
        assert chunk.get("system_fingerprint", "") is not None
    with_choices = [c for c in chunks if c["choices"]]
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    assert with_choices[-1]["choices"][0]["finish_reason"] in ("stop", "tool_calls")
    if usage:
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["usage"]["total_tokens"] > 0 and chunks[-1]["choices"] == []
    else:
        assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("fmt", ["float", "base64", None])
def test_embeddings_match_the_spec(any_gateway: ServerThread, fmt: str | None) -> None:
    body = {"model": "mock-embed", "input": ["a", "b"]}
    if fmt:
        body["encoding_format"] = fmt
    r = _post(any_gateway, "/v1/embeddings", body)
    validate(r.json(), "CreateEmbeddingResponse", base64_embeddings=fmt == "base64")


def test_models_match_the_spec(gateway: ServerThread) -> None:
    listing = httpx.get(gateway.url + "/v1/models", headers=AUTH).json()
    validate(listing, "ListModelsResponse")
    assert all({"owned_by", "created"} <= set(m) for m in listing["data"])
    validate(httpx.get(gateway.url + "/v1/models/mock-model", headers=AUTH).json(), "Model")


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("POST", "/v1/chat/completions", {"model": "m"}, AUTH, 400),
        ("POST", "/v1/chat/completions", {"model": "mock-model", "messages": MSG}, {}, 401),
        ("GET", "/-/plugins", None, AUTH, 403),
        ("POST", "/v1/chat/completions", {"model": "nope", "messages": MSG}, AUTH, 404),
        ("GET", "/v1/chat/completions", None, AUTH, 405),
        ("POST", "/v1/embeddings", {"model": "mock-embed"}, AUTH, 400),
        ("GET", "/v1/models/nope", None, AUTH, 404),
    ],
)
def test_errors_match_the_spec(
    gateway: ServerThread, method: str, path: str, body: object, headers: dict, status: int
) -> None:
    r = httpx.request(method, gateway.url + path, json=body, headers=headers)
    assert r.status_code == status
    validate(r.json(), "ErrorResponse")
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_admin_listing_is_json(gateway: ServerThread) -> None:
    r = httpx.get(gateway.url + "/-/plugins", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200 and r.json()["object"] == "list"
