"""The OpenAI schema helper (``tests/openai_schema.py``) accepts what OpenAI sends and rejects
what it does not, and the vendored subset is complete and labelled."""

from __future__ import annotations

import base64
import copy
import json
import struct
from pathlib import Path
from typing import Any

import openai_schema
import pytest
from openai_schema import openapi_document, rewrite_nullable, validate

CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-123",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}
CHUNK: dict[str, Any] = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1741570283,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "Hel"},
            "logprobs": None,
            "finish_reason": None,
        }
    ],
    "usage": None,
}
MODELS: dict[str, Any] = {
    "object": "list",
    "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "veil"}],
}
VECTOR = [0.25, -0.5, 1.0]
B64_VECTOR = base64.b64encode(struct.pack(f"<{len(VECTOR)}f", *VECTOR)).decode()


def embeddings(embedding: object) -> dict[str, Any]:
    return {
        "object": "list",
        "model": "text-embedding-3-small",
        "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }


ERROR: dict[str, Any] = {
    "error": {"message": "x", "type": "invalid_request_error", "param": None, "code": None}
}


def rejects(instance: object, schema_name: str, *expected: str, **kwargs: bool) -> str:
    """Assert ``validate`` fails and its message mentions every ``expected`` fragment."""
    with pytest.raises(AssertionError) as caught:
        validate(instance, schema_name, **kwargs)
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message, message
    return message


# --- valid bodies -----------------------------------------------------------------------------


def test_realistic_chat_completion_is_valid() -> None:
    validate(CHAT_COMPLETION, "CreateChatCompletionResponse")


def test_chat_completion_with_tool_calls_and_optional_fields_is_valid() -> None:
    body = copy.deepcopy(CHAT_COMPLETION)
    body["choices"][0]["message"].update(
        content=None,
        tool_calls=[
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
        annotations=[],
    )
    body["choices"][0]["finish_reason"] = "tool_calls"
    body.update(service_tier="default", system_fingerprint="fp_44709d6fcb")
    validate(body, "CreateChatCompletionResponse")


def test_stream_chunk_with_nulls_is_valid() -> None:
    # finish_reason (nullable enum), usage (nullable $ref) and logprobs (nullable object) are
    # OpenAPI 3.0 `nullable: true` in the document.
    validate(CHUNK, "CreateChatCompletionStreamResponse")


def test_final_usage_chunk_is_valid() -> None:
    chunk = dict(
        CHUNK, choices=[], usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    )
    validate(chunk, "CreateChatCompletionStreamResponse")


def test_models_list_is_valid() -> None:
    validate(MODELS, "ListModelsResponse")
    validate(MODELS["data"][0], "Model")


def test_float_embeddings_are_valid() -> None:
    validate(embeddings(VECTOR), "CreateEmbeddingResponse")


def test_base64_embeddings_are_valid_when_asked_for() -> None:
    validate(embeddings(B64_VECTOR), "CreateEmbeddingResponse", base64_embeddings=True)


def test_error_is_valid() -> None:
    validate(ERROR, "ErrorResponse")


def test_formats_are_annotations_only() -> None:
    # Model.shutdown_date has `format: date`; formats are not asserted.
    validate(dict(MODELS["data"][0], shutdown_date="not a date"), "Model")


# --- invalid bodies ---------------------------------------------------------------------------


def test_chunk_with_created_as_float_string_is_rejected() -> None:
    rejects(
        dict(CHUNK, created="1741570283.5"),
        "CreateChatCompletionStreamResponse",
        "$.created: '1741570283.5' is not of type 'integer'",
    )


def test_chat_completion_without_choices_is_rejected() -> None:
    body = {k: v for k, v in CHAT_COMPLETION.items() if k != "choices"}
    rejects(body, "CreateChatCompletionResponse", "'choices' is a required property")


def test_error_without_param_and_code_is_rejected() -> None:
    # `Error.required` is [type, message, param, code]: param and code may be null, not absent.
    message = rejects(
        {"error": {"message": "x", "type": "invalid_request_error"}},
        "ErrorResponse",
        "$.error: 'param' is a required property",
        "$.error: 'code' is a required property",
    )
    assert "2 problems" in message


def test_model_without_owned_by_is_rejected() -> None:
    model = {k: v for k, v in MODELS["data"][0].items() if k != "owned_by"}
    rejects(model, "Model", "'owned_by' is a required property")
    rejects({"object": "list", "data": [model]}, "ListModelsResponse", "$.data[0]")


def test_message_without_refusal_and_choice_without_logprobs_are_rejected() -> None:
    body = copy.deepcopy(CHAT_COMPLETION)
    del body["choices"][0]["logprobs"]
    del body["choices"][0]["message"]["refusal"]
    rejects(
        body,
        "CreateChatCompletionResponse",
        "$.choices[0]: 'logprobs' is a required property",
        "$.choices[0].message: 'refusal' is a required property",
    )


def test_null_system_fingerprint_is_rejected() -> None:
    # Not nullable in the document: omit it rather than sending null.
    rejects(
        dict(CHAT_COMPLETION, system_fingerprint=None),
        "CreateChatCompletionResponse",
        "$.system_fingerprint: None is not of type 'string'",
    )


def test_unknown_finish_reason_is_rejected_but_null_is_not() -> None:
    chunk = copy.deepcopy(CHUNK)
    chunk["choices"][0]["finish_reason"] = "done"
    message = rejects(chunk, "CreateChatCompletionStreamResponse", "$.choices[0].finish_reason")
    # the anyOf alternatives are explained underneath
    assert "is not one of" in message and "is not of type 'null'" in message


def test_base64_embedding_is_not_in_the_published_schema() -> None:
    rejects(embeddings(B64_VECTOR), "CreateEmbeddingResponse", "is not of type 'array'")
    rejects(
        embeddings(VECTOR),
        "CreateEmbeddingResponse",
        "is not of type 'string'",
        base64_embeddings=True,
    )
    rejects(
        embeddings("not base64!"),
        "CreateEmbeddingResponse",
        "does not match",
        base64_embeddings=True,
    )


def test_every_error_is_listed() -> None:
    body = {"object": "chat.completion", "created": "now", "choices": [{}]}
    message = rejects(body, "CreateChatCompletionResponse")
    for fragment in (
        "$: 'id' is a required property",
        "$: 'model' is a required property",
        "$.created: 'now' is not of type 'integer'",
        "$.choices[0]: 'finish_reason' is a required property",
    ):
        assert fragment in message, message


def test_unknown_schema_name() -> None:
    with pytest.raises(KeyError, match="CreateChatCompletionResponse"):
        validate({}, "NoSuchSchema")


# --- nullable rewriting -----------------------------------------------------------------------


def test_rewrite_nullable() -> None:
    original = {
        "type": "object",
        "properties": {
            "nullable": {"type": "boolean"},  # a property called "nullable"
            "reason": {"type": "string", "enum": ["stop"], "nullable": True},
            "usage": {"$ref": "#/components/schemas/CompletionUsage", "nullable": True},
            "n": {"type": "integer", "nullable": False, "example": {"nullable": True}},
        },
    }
    snapshot = copy.deepcopy(original)
    rewritten = rewrite_nullable(original)
    assert original == snapshot  # pure
    props = rewritten["properties"]
    assert props["nullable"] == {"type": "boolean"}
    assert props["reason"] == {"anyOf": [{"type": "string", "enum": ["stop"]}, {"type": "null"}]}
    assert props["usage"] == {
        "anyOf": [{"$ref": "#/components/schemas/CompletionUsage"}, {"type": "null"}]
    }
    assert props["n"] == {"type": "integer", "example": {"nullable": True}}


def _schema_positions(node: Any, inside_schema: bool = False) -> list[dict[str, Any]]:
    """Every schema object in an OpenAPI document (components and media-type schemas)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if inside_schema:
            found.append(node)
        for key, value in node.items():
            if key in ("example", "examples", "default", "enum", "const"):
                continue
            if key in ("properties", "patternProperties", "$defs") and isinstance(value, dict):
                for sub in value.values():
                    found += _schema_positions(sub, True)
            elif key in ("schema", "itemSchema", "contentSchema"):
                found += _schema_positions(value, True)
            else:
                found += _schema_positions(value, inside_schema)
    elif isinstance(node, list):
        for item in node:
            found += _schema_positions(item, inside_schema)
    return found


def test_openapi_document_has_no_nullable_left() -> None:
    document = openapi_document()
    positions = _schema_positions(document["paths"]) + [
        s
        for schema in document["components"]["schemas"].values()
        for s in _schema_positions(schema, True)
    ]
    assert len(positions) > 500
    assert not [s for s in positions if "nullable" in s]
    raw = json.loads(openai_schema.SPEC_PATH.read_text(encoding="utf-8"))
    assert json.dumps(raw).count('"nullable": true') >= 20  # the file itself is as published


# --- the document given to schemathesis -------------------------------------------------------


def test_openapi_document_overlays() -> None:
    document = openapi_document()
    assert document["servers"] == [{"url": "/v1"}]
    assert set(document["paths"]) == {"/chat/completions", "/embeddings", "/models"}
    chat = document["paths"]["/chat/completions"]["post"]["responses"]
    stream = chat["200"]["content"]["text/event-stream"]
    assert "schema" not in stream and "[DONE]" in json.dumps(stream["itemSchema"])
    assert chat["4XX"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    tool_calls = document["components"]["schemas"]["ChatCompletionMessageToolCalls"]["items"]
    assert tool_calls["discriminator"]["mapping"]["function"].endswith(
        "/ChatCompletionMessageToolCall"
    )
    # a fresh copy every time
    document["servers"].append({"url": "/elsewhere"})
    assert openapi_document()["servers"] == [{"url": "/v1"}]


def test_openapi_document_loads_in_schemathesis() -> None:
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_dict(openapi_document())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert sorted(op.label for op in operations) == [
        "GET /models",
        "POST /chat/completions",
        "POST /embeddings",
    ]


# --- the vendored file ------------------------------------------------------------------------


def test_vendored_subset_is_found_next_to_the_module() -> None:
    spec = openai_schema.SPEC_PATH
    assert spec == Path(openai_schema.__file__).resolve().parent / "spec" / "openai-subset.json"
    assert spec.is_file()
    assert spec.stat().st_size < 400_000
    assert (spec.parent / "LICENSE-openai-openapi.txt").is_file()


def test_vendored_subset_is_closed_and_labelled() -> None:
    raw = json.loads(openai_schema.SPEC_PATH.read_text(encoding="utf-8"))
    text = json.dumps(raw)
    assert '"x-oaiMeta":' not in text
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        section, name = ref.removeprefix("#/components/").split("/")
        assert name in raw["components"][section], ref
    provenance = raw["x-veil-provenance"]
    assert provenance["repository"] == "openai/openai-openapi"
    assert provenance["commit"] == "f85dbe223d40e1a31cba812ab2d755c7e98a92a3"
    assert provenance["licence"] == "MIT, Copyright (c) OpenAI"
    for name in provenance["root_schemas"]:
        assert name in raw["components"]["schemas"]
