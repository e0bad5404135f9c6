"""Property-based fuzzing of the three endpoints from OpenAI's own document
(schemathesis): valid and invalid bodies, and the gateway never answers 5xx.

Every response is also checked against the document (documented statuses),
and every error against ``ErrorResponse``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from openai_schema import openapi_document, validate  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error, response_schema_conformance  # noqa: E402

from veil.app import create_app  # noqa: E402
from veil.testing import TEST_KEY, PolicyKit, ServerThread, policy_toml  # noqa: E402

SCHEMA = schemathesis.openapi.from_dict(openapi_document())
OPERATIONS = [("/chat/completions", "POST"), ("/embeddings", "POST"), ("/models", "GET")]
KNOWN_MODEL = {"/chat/completions": "mock-model", "/embeddings": "mock-embed"}
ANSWER_SCHEMA = {
    "/chat/completions": "CreateChatCompletionResponse",
    "/embeddings": "CreateEmbeddingResponse",
    "/models": "ListModelsResponse",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    kit = PolicyKit(tmp_path_factory.mktemp("fuzz"))
    config = kit.config(kit.write(policy_toml()), watch_interval=0)
    with ServerThread(create_app(config)) as s:
        yield s


def _aim(path: str) -> Any:
    """Half of the dict bodies name a model the policy serves, so that the
    fuzzer reaches the upstream path too, not just 404s."""

    def aim(pair: tuple[Any, bool]) -> Any:
        case, use_known = pair
        if use_known and isinstance(case.body, dict) and path in KNOWN_MODEL:
            case.body["model"] = KNOWN_MODEL[path]
        return case

    return aim


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=lambda v: str(v).strip("/"))
def test_fuzzed_requests_never_get_a_5xx(
    server: ServerThread, path: str, method: str, mode: GenerationMode
) -> None:
    operation = SCHEMA[path][method]
    strategy = st.tuples(operation.as_strategy(generation_mode=mode), st.booleans()).map(_aim(path))

    @settings(
        max_examples=int(os.environ.get("VEIL_FUZZ_EXAMPLES", "60")),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(
            base_url=server.url + "/v1", headers={"authorization": f"Bearer {TEST_KEY}"}
        )
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
        # and again with our validator (nullable read the OpenAPI 3.0 way)
        if response.status_code >= 400:
            validate(response.json(), "ErrorResponse")
        elif "application/json" in str(response.headers.get("content-type")):
            b64 = isinstance(case.body, dict) and case.body.get("encoding_format") == "base64"
            validate(response.json(), ANSWER_SCHEMA[path], base64_embeddings=b64)

    run()
