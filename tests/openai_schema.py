"""Validate bodies against OpenAI's own OpenAPI schemas (vendored subset).

``validate(body, "CreateChatCompletionResponse")`` raises ``AssertionError``
listing every violation. ``openapi_document()`` gives the subset as an
OpenAPI document for schemathesis (see ``tests/test_fuzz.py``).

The subset is ``spec/openai-subset.json`` next to this module (found relative to
this file, not the working directory); ``spec/README.md`` says where it comes
from. How the document is read:

- It says OpenAPI 3.1 but still carries OpenAPI 3.0 ``nullable: true``; a
  nullable schema also accepts null (even when its ``enum`` omits null).
- ``format`` (``unixtime``, ``float``...) is an annotation, never enforced.
- ``Embedding.embedding`` is published as a list of numbers only; for a
  response to ``encoding_format: "base64"`` pass ``base64_embeddings=True``.
- ``Error`` requires all four keys ``message``, ``type``, ``param`` and
  ``code`` (``param``/``code`` may be null, but must be present).

Schemathesis 4.x against a live server (verified with schemathesis 4.32 and
hypothesis 6.170 against a throwaway local server, under ``-W error``)::

    import schemathesis
    from hypothesis import settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error, response_schema_conformance

    from openai_schema import openapi_document

    BASE_URL = "http://127.0.0.1:PORT"
    schema = schemathesis.openapi.from_dict(openapi_document())
    schema.config.update(
        base_url=f"{BASE_URL}/v1",                      # must include /v1, see 1.
        headers={"Authorization": "Bearer KEY"},        # b)
    )
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],  # a)
        max_examples=50,                                           # d)
    )
    schema.config.phases.update(phases=["examples", "fuzzing"])    # d)

    @schema.parametrize()
    @settings(deadline=None, max_examples=50)                      # d)
    def test_openai_conformance(case):
        case.call_and_validate(
            checks=[not_a_server_error, response_schema_conformance]  # c)
        )

1. ``base_url``: once a base URL is set, schemathesis 4 takes the base path
   from it and ignores ``servers``; the same holds for
   ``case.call(base_url=...)``. ``f"{BASE_URL}/v1"`` is what maps the paths to
   ``/v1/chat/completions`` etc. (``servers: [{"url": "/v1"}]`` only applies
   when no base URL is given, and a document loaded with ``from_dict`` has no
   host of its own).

a) Both generation modes: positive cases are valid bodies, negative cases are
   invalid ones (wrong types, missing required fields...). Which one a case is:
   ``case.meta.generation.mode``. Both are also the default.

b) Headers given to ``schema.config.update`` go on every request and satisfy
   the document's bearer security scheme, so negative mode leaves them alone.
   Passing ``headers=`` to ``case.call*`` instead is not enough: negative mode
   then also sends requests without ``Authorization`` (``GET /models`` got
   401s in the experiment).

c) ``checks=`` replaces the default set. ``response_schema_conformance``
   validates 200 JSON bodies, streamed answers event by event, and 4XX error
   bodies (see :func:`openapi_document`); statuses the document does not
   list (e.g. 5XX) are not schema-checked. Use ``case.call()`` plus
   ``case.validate_response(response, checks=[...])`` to look at the response
   yourself.

d) ``max_examples`` (config or ``@settings``, either works) bounds the
   *fuzzing* phase per operation; the *coverage* phase ignores it and sent
   about 1,200 requests to ``POST /chat/completions`` alone, hence
   ``phases=["examples", "fuzzing"]`` (the examples phase adds the document's
   few explicit examples). Schemathesis already runs without a hypothesis
   deadline; ``@settings(deadline=None)`` just makes it explicit.

For one strategy per operation and mode instead of ``parametrize``, see
``tests/test_fuzz.py`` (``schema[path][method].as_strategy(generation_mode=...)``).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parent / "spec" / "openai-subset.json"
"""The vendored subset (see ``tests/spec/README.md``), found relative to this module."""

DOCUMENT_URI = "urn:veil:openai-openapi-subset"
"""Base URI the document is registered under, so ``#/components/schemas/...`` refs resolve."""

BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""Standard (RFC 4648 section 4) padded base64, as OpenAI returns for ``encoding_format=base64``."""

# JSON Schema keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SUBSCHEMA = frozenset(
    {
        "items",
        "additionalItems",
        "additionalProperties",
        "unevaluatedItems",
        "unevaluatedProperties",
        "propertyNames",
        "contains",
        "not",
        "if",
        "then",
        "else",
        "contentSchema",
    }
)
_SUBSCHEMA_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SUBSCHEMA_MAP = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
# OpenAPI objects (media types, parameters, headers) hold their schema under these keys.
_OPENAPI_SCHEMA_KEYS = frozenset({"schema", "itemSchema"})
# OpenAPI fields whose values are example data, never schemas.
_OPENAPI_DATA_KEYS = frozenset({"example", "examples", "default", "enum", "const"})

_MAX_MESSAGE = 400


def rewrite_nullable(schema: Any) -> Any:
    """Return a copy of ``schema`` with OpenAPI 3.0 ``nullable`` read the 3.0 way.

    ``{..., "nullable": true}`` becomes ``{"anyOf": [{...}, {"type": "null"}]}``: the original
    schema (with all its keywords, including a ``$ref`` and its siblings, or an ``enum`` that does
    not list null) or null. ``nullable: false`` is simply dropped. Only real schema positions are
    rewritten: a *property* called ``nullable`` and example/default data are left alone.
    """
    if not isinstance(schema, dict):
        return copy.deepcopy(schema)  # boolean schema
    rewritten: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA and isinstance(value, dict | bool):
            rewritten[key] = rewrite_nullable(value)
        elif key in _SUBSCHEMA_LIST and isinstance(value, list):
            rewritten[key] = [rewrite_nullable(item) for item in value]
        elif key in _SUBSCHEMA_MAP and isinstance(value, dict):
            rewritten[key] = {name: rewrite_nullable(item) for name, item in value.items()}
        elif key != "nullable":
            rewritten[key] = copy.deepcopy(value)
    if schema.get("nullable") is True:
        return {"anyOf": [rewritten, {"type": "null"}]}
    return rewritten


def _rewrite_openapi_objects(node: Any) -> Any:
    """Rewrite the schemas held by OpenAPI objects (paths, responses) in a copy of ``node``."""
    if isinstance(node, dict):
        return {
            key: (
                rewrite_nullable(value)
                if key in _OPENAPI_SCHEMA_KEYS
                else copy.deepcopy(value)
                if key in _OPENAPI_DATA_KEYS
                else _rewrite_openapi_objects(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_openapi_objects(item) for item in node]
    return node


@functools.cache
def _raw_document() -> dict[str, Any]:
    """The vendored subset exactly as stored (never mutated)."""
    with SPEC_PATH.open(encoding="utf-8") as handle:
        document: dict[str, Any] = json.load(handle)
    return document


@functools.cache
def _document(base64_embeddings: bool) -> dict[str, Any]:
    """The subset with ``nullable`` rewritten (cached; callers must not mutate it).

    With ``base64_embeddings``, ``Embedding.embedding`` must be a base64 string instead of a list of
    numbers (see :func:`validate`).
    """
    raw = _raw_document()
    document = {
        key: copy.deepcopy(value)
        for key, value in raw.items()
        if key not in ("paths", "components")
    }
    document["paths"] = _rewrite_openapi_objects(raw["paths"])
    components = {key: value for key, value in raw["components"].items() if key != "schemas"}
    document["components"] = _rewrite_openapi_objects(components)
    document["components"]["schemas"] = {
        name: rewrite_nullable(schema) for name, schema in raw["components"]["schemas"].items()
    }
    if base64_embeddings:
        embedding = document["components"]["schemas"]["Embedding"]["properties"]["embedding"]
        embedding.clear()
        embedding.update(
            {
                "type": "string",
                "contentEncoding": "base64",
                "pattern": BASE64_PATTERN,
                "description": (
                    "veil test overlay: with encoding_format=base64 OpenAI returns the vector as "
                    "base64 of little-endian float32 values; the published schema only "
                    "describes the list of floats."
                ),
            }
        )
    return document


@functools.cache
def _registry(base64_embeddings: bool) -> Registry:
    """A ``referencing`` registry holding the (rewritten) document under ``DOCUMENT_URI``."""
    resource = Resource(contents=_document(base64_embeddings), specification=DRAFT202012)
    return Registry().with_resource(DOCUMENT_URI, resource)


@functools.cache
def _validator(schema_name: str, base64_embeddings: bool) -> Draft202012Validator:
    """A Draft 2020-12 validator for one component schema (formats are not asserted)."""
    if schema_name not in _document(base64_embeddings)["components"]["schemas"]:
        known = ", ".join(schema_names())
        raise KeyError(f"unknown schema {schema_name!r}; the vendored subset has: {known}")
    root = {"$ref": f"{DOCUMENT_URI}#/components/schemas/{schema_name}"}
    return Draft202012Validator(root, registry=_registry(base64_embeddings))


def schema_names() -> list[str]:
    """Names of every component schema in the vendored subset."""
    return sorted(_raw_document()["components"]["schemas"])


def schema(schema_name: str) -> dict[str, Any]:
    """A copy of one component schema, ``nullable`` rewritten, ``#/components/...`` refs kept."""
    return copy.deepcopy(_document(False)["components"]["schemas"][schema_name])


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _describe(errors: Iterable[ValidationError], indent: str = "") -> list[str]:
    """Render errors (and, for anyOf/oneOf, why each alternative failed) one per line."""
    lines: list[str] = []
    for error in sorted(errors, key=lambda e: (list(map(str, e.absolute_path)), e.message)):
        lines.append(f"{indent}{error.json_path}: {_shorten(error.message)}")
        if error.context and len(indent) < 8:
            lines.extend(_describe(error.context, indent + "    "))
    return lines


def errors(instance: Any, schema_name: str, *, base64_embeddings: bool = False) -> list[str]:
    """Every validation error of ``instance`` against ``schema_name``, one line each."""
    return _describe(_validator(schema_name, base64_embeddings).iter_errors(instance))


def validate(instance: Any, schema_name: str, *, base64_embeddings: bool = False) -> None:
    """Assert that ``instance`` is valid against the OpenAI component schema ``schema_name``.

    Raises ``AssertionError`` whose message lists every error with its JSON path (for ``anyOf``
    and ``oneOf`` failures, the reasons each alternative was rejected are indented below).
    ``nullable: true`` is honoured the OpenAPI 3.0 way; ``format`` is not enforced.

    The published ``Embedding`` schema only allows ``embedding`` to be a list of numbers, yet
    OpenAI (and the official SDKs, which ask for it by default) use ``encoding_format=base64``,
    which returns a base64 string. Pass ``base64_embeddings=True`` when checking the response to
    such a request: ``embedding`` must then be a base64 string.
    """
    __tracebackhide__ = True
    problems = errors(instance, schema_name, base64_embeddings=base64_embeddings)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        raise AssertionError(f"not a valid OpenAI {schema_name} ({count}):\n" + "\n".join(problems))


def sse_event_schema(chunk_schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.2 ``itemSchema`` for one server-sent event whose ``data`` is a JSON chunk.

    OpenAI's document gives ``text/event-stream`` the schema of the *parsed chunk*; schemathesis 4
    validates each parsed *event* (``{"data": "...", "event": "message", ...}``) against the
    media type's schema, so as published every streamed response would fail. This describes the
    event instead: ``data`` is either the ``[DONE]`` sentinel or JSON valid against
    ``chunk_schema``.
    """
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": copy.deepcopy(chunk_schema),
                    },
                ]
            }
        },
    }


ERROR_STATUS_KEY = "4XX"
"""Response key :func:`openapi_document` adds, with an ``ErrorResponse`` body, to each operation."""


def _add_discriminator_mappings(node: Any, schemas: dict[str, Any]) -> None:
    """Give every ``discriminator`` without a ``mapping`` the mapping its branches imply (in place).

    OpenAI's discriminators (``type`` of tool calls, content parts, response formats; ``role`` of
    request messages) omit ``mapping``. By OpenAPI rules the implicit values are then the *schema
    names* (``ChatCompletionMessageToolCall``), while the data carries ``"function"``; schemathesis
    4 reports such responses as a discriminator mismatch. The mapping is read from each branch's
    single-valued ``enum``/``const`` for the property; a discriminator whose branches do not all
    have one is left alone.
    """
    if isinstance(node, list):
        for item in node:
            _add_discriminator_mappings(item, schemas)
        return
    if not isinstance(node, dict):
        return
    discriminator = node.get("discriminator")
    if isinstance(discriminator, dict) and "mapping" not in discriminator:
        prop = discriminator.get("propertyName")
        branches = node.get("oneOf") or node.get("anyOf") or []
        mapping: dict[str, str] = {}
        for branch in branches:
            ref = branch.get("$ref", "") if isinstance(branch, dict) else ""
            target = schemas.get(ref.rpartition("/")[2], {}) if ref.startswith("#/") else {}
            prop_schema = target.get("properties", {}).get(prop, {})
            values = [prop_schema["const"]] if "const" in prop_schema else prop_schema.get("enum")
            if not isinstance(values, list) or len(values) != 1 or not isinstance(values[0], str):
                break
            mapping[values[0]] = ref
        else:
            if mapping and len(mapping) == len(branches):
                discriminator["mapping"] = mapping
    for key, value in node.items():
        if key not in _OPENAPI_DATA_KEYS:
            _add_discriminator_mappings(value, schemas)


def openapi_document(
    *, base64_embeddings: bool = True, error_responses: bool = True
) -> dict[str, Any]:
    """A fresh copy of the subset as an OpenAPI document for schemathesis.

    Compared with the vendored file (which stays exactly as published):

    - ``nullable: true`` is rewritten as in :func:`rewrite_nullable`;
    - ``servers`` is ``[{"url": "/v1"}]`` (but see the module docstring: schemathesis 4 takes the
      path from ``base_url`` when one is set, so ``base_url`` must end in ``/v1``);
    - each ``text/event-stream`` response gets an ``itemSchema`` from :func:`sse_event_schema`
      instead of the chunk schema, so streamed answers are checked chunk by chunk (``[DONE]`` ok);
    - discriminators get explicit mappings (:func:`_add_discriminator_mappings`);
    - with ``base64_embeddings``, ``Embedding.embedding`` may be a list of numbers *or* a base64
      string (the response schema cannot depend on the request's ``encoding_format``);
    - with ``error_responses``, every operation documents ``4XX`` with an ``ErrorResponse`` body
      (the published document lists only 200, and 429 for two operations; OpenAI documents
      400/401/404 errors with that body), so schemathesis also checks error bodies.
    """
    document = copy.deepcopy(_document(False))
    document["servers"] = [{"url": "/v1"}]
    schemas = document["components"]["schemas"]
    for path_item in document["paths"].values():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            for response in responses.values():
                content = response.get("content", {})
                for media_type, media in content.items():
                    if media_type == "text/event-stream" and "schema" in media:
                        content[media_type] = {"itemSchema": sse_event_schema(media["schema"])}
            if error_responses and ERROR_STATUS_KEY not in responses:
                responses[ERROR_STATUS_KEY] = {
                    "description": "Error (veil test overlay: OpenAI's documented error body).",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                        }
                    },
                }
    _add_discriminator_mappings(document, schemas)
    if base64_embeddings:
        embedding = schemas["Embedding"]["properties"]["embedding"]
        base64 = _document(True)["components"]["schemas"]["Embedding"]["properties"]["embedding"]
        as_published = dict(embedding)
        embedding.clear()
        embedding["anyOf"] = [as_published, copy.deepcopy(base64)]
    return document
