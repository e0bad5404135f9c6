#!/usr/bin/env python3
"""Extract the part of OpenAI's OpenAPI document that veil's tests validate against.

The full document (openai/openai-openapi, ``openapi.yaml``) is about 3 MB of YAML. The tests only
need the chat completions, embeddings and models operations plus every component they reference,
so this script copies exactly that closure into ``tests/spec/openai-subset.json``.

The content is copied unchanged (``nullable`` is *not* rewritten here; ``tests/openai_schema.py``
does that when loading). The only things removed are ``x-oaiMeta`` extension objects (rendering
metadata for OpenAI's docs site: long code samples) and the top-level parts of the document that
are unrelated to the three operations.

Usage (from the repository root)::

    .venv/bin/python tests/spec/extract_openai_subset.py
    .venv/bin/python tests/spec/extract_openai_subset.py --spec path/to/openapi.yaml --out out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DEFAULT_SPEC = REPO_ROOT.parent / "shared" / "spec" / "openai-openapi.yaml"
DEFAULT_OUT = HERE / "openai-subset.json"

SOURCE_REPOSITORY = "openai/openai-openapi"
SOURCE_COMMIT = "f85dbe223d40e1a31cba812ab2d755c7e98a92a3"
SOURCE_PATH = "openapi.yaml"
LICENCE = "MIT, Copyright (c) OpenAI"

ROOT_SCHEMAS: tuple[str, ...] = (
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateEmbeddingRequest",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
)
OPERATIONS: tuple[tuple[str, str], ...] = (
    ("/chat/completions", "post"),
    ("/embeddings", "post"),
    ("/models", "get"),
)
# Keys dropped wherever they occur: documentation-site metadata, not part of any schema.
DROPPED_KEYS = frozenset({"x-oaiMeta"})
# Keys whose values are data (instances), not schema: never walked for `$ref`s or dropped keys.
DATA_KEYS = frozenset({"example", "examples", "default", "enum", "const"})
# Keywords whose value maps names (property names, definition names) to schemas.
NAME_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def _yaml_loader() -> type[yaml.SafeLoader]:
    """Return a safe YAML loader (libyaml-backed if available) that keeps timestamps as strings.

    YAML 1.1 turns unquoted ``2024-10-01`` into a ``datetime.date``; JSON has no such type and the
    document is a JSON-compatible OpenAPI description, so such scalars stay strings.
    """
    base: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc, valid-type]
        """Safe loader without the implicit timestamp resolver."""

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in base.yaml_implicit_resolvers.items()
    }
    return Loader


def load_document(path: Path) -> dict[str, Any]:
    """Load the OpenAPI YAML document at ``path``."""
    with path.open("rb") as handle:
        document = yaml.load(handle, Loader=_yaml_loader())
    if not isinstance(document, dict) or "components" not in document:
        raise SystemExit(f"{path}: does not look like an OpenAPI document")
    return document


def iter_refs(node: Any, *, names: bool = False) -> Iterator[str]:
    """Yield every ``$ref`` string inside ``node``.

    Example/default/enum/const values are data, not schema, and are not searched. ``names`` is true
    when the keys of ``node`` are property names (``properties`` and friends), which are never
    keywords even when a property is called ``default`` or ``$ref``.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if names:
                yield from iter_refs(value)
            elif key == "$ref" and isinstance(value, str):
                yield value
            elif key not in DATA_KEYS and key not in DROPPED_KEYS:
                yield from iter_refs(value, names=key in NAME_MAPS)
    elif isinstance(node, list):
        for item in node:
            yield from iter_refs(item)


def strip(node: Any, *, names: bool = False) -> Any:
    """Return a deep copy of ``node`` without the extension keys in ``DROPPED_KEYS``."""
    if isinstance(node, dict):
        if names:
            return {key: strip(value) for key, value in node.items()}
        return {
            key: (
                copy.deepcopy(value) if key in DATA_KEYS else strip(value, names=key in NAME_MAPS)
            )
            for key, value in node.items()
            if key not in DROPPED_KEYS
        }
    if isinstance(node, list):
        return [strip(item) for item in node]
    return node


def _split_ref(ref: str) -> tuple[str, str]:
    """Split ``#/components/<section>/<name>`` into ``(section, name)``."""
    prefix = "#/components/"
    parts = ref[len(prefix) :].split("/") if ref.startswith(prefix) else []
    if len(parts) != 2:
        raise SystemExit(f"unsupported $ref {ref!r}: only #/components/<section>/<name> is handled")
    section, name = parts
    return section, name.replace("~1", "/").replace("~0", "~")


def build_subset(document: dict[str, Any], *, commit: str = SOURCE_COMMIT) -> dict[str, Any]:
    """Build the subset document: the three operations and the closure of their components."""
    components = document["components"]
    paths: dict[str, dict[str, Any]] = {}
    for path, method in OPERATIONS:
        operation = document["paths"][path][method]
        paths.setdefault(path, {})[method] = strip(operation)

    wanted: dict[str, set[str]] = {"schemas": set(ROOT_SCHEMAS)}
    pending: list[tuple[str, str]] = [("schemas", name) for name in ROOT_SCHEMAS]
    pending += [_split_ref(ref) for ref in iter_refs(paths)]
    while pending:
        section, name = pending.pop()
        if section not in components or name not in components[section]:
            raise SystemExit(f"dangling reference #/components/{section}/{name}")
        wanted.setdefault(section, set()).add(name)
        for ref in iter_refs(components[section][name]):
            target = _split_ref(ref)
            if target[1] not in wanted.get(target[0], set()):
                wanted.setdefault(target[0], set()).add(target[1])
                pending.append(target)

    subset_components: dict[str, Any] = {
        section: {name: strip(components[section][name]) for name in sorted(names)}
        for section, names in wanted.items()
    }
    # The operations inherit the document-wide bearer-token requirement; keep it resolvable.
    security = document.get("security", [])
    schemes = {name for requirement in security for name in requirement}
    if schemes:
        subset_components["securitySchemes"] = {
            name: strip(components["securitySchemes"][name]) for name in sorted(schemes)
        }

    info = document.get("info", {})
    subset: dict[str, Any] = {
        "openapi": document["openapi"],
        "info": {key: info[key] for key in ("title", "version", "license") if key in info},
        "servers": document.get("servers", []),
        "security": security,
        "paths": paths,
        "components": subset_components,
        "x-veil-provenance": {
            "repository": SOURCE_REPOSITORY,
            "commit": commit,
            "path": SOURCE_PATH,
            "licence": LICENCE,
            "note": (
                "Generated subset, do not edit by hand: the POST /chat/completions, "
                "POST /embeddings and GET /models operations and every component they reference "
                "(transitively), copied unchanged except that x-oaiMeta objects are removed. "
                "Regenerate with tests/spec/extract_openai_subset.py. Generated from a copy of "
                "openapi.yaml that differs from the published file only in one description string "
                "(CreateEmbeddingRequest.encoding_format: a markdown link to the pybase64 "
                "package page is replaced by the package name)."
            ),
            "root_schemas": list(ROOT_SCHEMAS),
        },
    }
    _check_closed(subset)
    return subset


def _check_closed(subset: dict[str, Any]) -> None:
    """Fail if any ``$ref`` in ``subset`` points outside it."""
    for ref in iter_refs(subset):
        section, name = _split_ref(ref)
        if name not in subset["components"].get(section, {}):
            raise SystemExit(f"subset is not closed: {ref} is missing")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=(
            "Write the OpenAI OpenAPI subset (chat completions, embeddings, models and the "
            "closure of their schemas) that veil's tests vendor."
        )
    )
    parser.add_argument(
        "--spec",
        type=Path,
        default=DEFAULT_SPEC,
        help="OpenAI openapi.yaml to read (default: ../shared/spec/openai-openapi.yaml "
        "relative to the repository root)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="JSON file to write (default: tests/spec/openai-subset.json next to this script)",
    )
    parser.add_argument(
        "--commit",
        default=SOURCE_COMMIT,
        help=f"source commit recorded in x-veil-provenance (default: {SOURCE_COMMIT})",
    )
    args = parser.parse_args(argv)

    if not args.spec.is_file():
        parser.error(f"spec not found: {args.spec}")
    subset = build_subset(load_document(args.spec), commit=args.commit)
    text = json.dumps(subset, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    args.out.write_text(text, encoding="utf-8")
    counts = ", ".join(
        f"{len(entries)} {section}" for section, entries in sorted(subset["components"].items())
    )
    size = len(text.encode("utf-8"))
    print(f"wrote {args.out} ({size:,} bytes; {counts})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
