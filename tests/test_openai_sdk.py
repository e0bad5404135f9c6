"""The official openai SDK, sync and async, against the real gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import openai
import pytest

from veil.testing import OTHER_KEY, TEST_KEY, ServerThread


def _client(gw: ServerThread, key: str = TEST_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def test_plain_chat_completion(any_gateway: ServerThread) -> None:
    with _client(any_gateway) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="mock-model",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
            ],
        )
    answer = raw.parse()
    assert answer.choices[0].message.content.endswith("You said: Hi there")
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert raw.headers["x-veil-model"] == "mock-model"
    assert raw.headers["x-request-id"]


def test_client_request_id_is_echoed(gateway: ServerThread) -> None:
    with _client(gateway) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="mock-model",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-request-id": "trace-123"},
        )
    assert raw.headers["x-request-id"] == "trace-123"


def test_streaming_with_usage(any_gateway: ServerThread) -> None:
    with _client(any_gateway) as client:
        stream = client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "stream this please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("You said: stream this please")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])


def test_streaming_without_usage_hides_usage_chunk(any_gateway: ServerThread) -> None:
    with _client(any_gateway) as client:
        chunks = list(
            client.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": "hello"}], stream=True
            )
        )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_tool_calls(any_gateway: ServerThread) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"],
                },
            },
        }
    ]
    with _client(any_gateway) as client:
        answer = client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=tools,
            tool_choice="auto",
        )
        call = answer.choices[0].message.tool_calls[0]
        assert answer.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        assert set(args) == {"city", "days"}
        # the tool result goes back, and the model answers in text
        follow = client.chat.completions.create(
            model="mock-model",
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                answer.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
            ],
            tools=tools,
        )
        assert follow.choices[0].message.content
        # and streamed: the arguments arrive in pieces
        stream = client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=tools,
            stream=True,
        )
        pieces = [
            tc.function.arguments or ""
            for c in stream
            if c.choices and c.choices[0].delta.tool_calls
            for tc in c.choices[0].delta.tool_calls
        ]
    assert "".join(pieces) == call.function.arguments
    assert len(pieces) > 2


def test_json_mode(any_gateway: ServerThread) -> None:
    with _client(any_gateway) as client:
        answer = client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "Give JSON"}],
            response_format={"type": "json_object"},
        )
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_n_stop_and_max_tokens(gateway: ServerThread) -> None:
    with _client(gateway) as client:
        answer = client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "one two three"}], n=2
        )
        assert [c.index for c in answer.choices] == [0, 1]
        cut = client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "one two"}], max_tokens=2
        )
        assert cut.choices[0].finish_reason == "length"
        stopped = client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "one two"}], stop=["said"]
        )
        assert "said" not in stopped.choices[0].message.content


def test_unknown_fields_pass_through(upstream_gateway: ServerThread) -> None:
    """Fields veil does not know reach the upstream untouched (the mock echoes
    nothing of them, so check the gateway did not refuse them)."""
    with _client(upstream_gateway) as client:
        answer = client.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "hi"}],
            user="end-user-1",
            metadata={"feature": "search"},
            extra_body={"some_vendor_field": {"x": 1}, "top_k": 5},
        )
    assert answer.choices[0].message.content


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_embeddings(any_gateway: ServerThread, fmt: str) -> None:
    with _client(any_gateway) as client:
        if fmt == "base64":
            # the SDK asks for base64 by default and decodes it itself
            result = client.embeddings.create(model="mock-embed", input=["hello", "world"])
        else:
            result = client.embeddings.create(
                model="mock-embed", input="hello", encoding_format="float"
            )
    assert all(len(d.embedding) == 64 for d in result.data)
    assert abs(sum(x * x for x in result.data[0].embedding) - 1.0) < 1e-3


def test_embeddings_base64_on_the_wire(gateway: ServerThread) -> None:
    import httpx

    r = httpx.post(
        gateway.url + "/v1/embeddings",
        headers={"authorization": f"Bearer {TEST_KEY}"},
        json={"model": "mock-embed", "input": "hello", "encoding_format": "base64"},
    )
    vec = struct.unpack("<64f", base64.b64decode(r.json()["data"][0]["embedding"]))
    assert abs(sum(x * x for x in vec) - 1.0) < 1e-3


def test_models_lists_only_what_the_team_may_use(gateway: ServerThread) -> None:
    with _client(gateway) as client:
        mine = {m.id for m in client.models.list()}
        assert client.models.retrieve("test-only").owned_by == "mock"
    with _client(gateway, OTHER_KEY) as other:
        theirs = {m.id for m in other.models.list()}
        with pytest.raises(openai.NotFoundError):
            other.models.retrieve("test-only")
        with pytest.raises(openai.NotFoundError) as e:
            other.chat.completions.create(
                model="test-only", messages=[{"role": "user", "content": "x"}]
            )
    assert mine == {"mock-model", "test-only", "mock-embed"}
    assert theirs == {"mock-model", "mock-embed"}
    assert e.value.code == "model_not_found"


def test_error_statuses_raise_the_sdk_exceptions(gateway: ServerThread) -> None:
    with _client(gateway, "sk-veil-wrong") as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": "x"}]
            )
        assert e.value.code == "invalid_api_key"
    with _client(gateway) as client:
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}]
            )
        assert e.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="mock-model", messages=[])
        assert e.value.param == "messages"


def test_async_client(any_gateway: ServerThread) -> None:
    async def main() -> tuple[list[str], str]:
        async with openai.AsyncOpenAI(
            base_url=any_gateway.url + "/v1", api_key=TEST_KEY, max_retries=0
        ) as client:
            answers = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="mock-model", messages=[{"role": "user", "content": f"q{i}"}]
                    )
                    for i in range(20)
                )
            )
            stream = await client.chat.completions.create(
                model="mock-model",
                messages=[{"role": "user", "content": "async stream"}],
                stream=True,
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return [a.choices[0].message.content for a in answers], text

    contents, text = asyncio.run(main())
    assert [c.rsplit(" ", 1)[-1] for c in contents] == [f"q{i}" for i in range(20)]
    assert text.endswith("async stream")
