"""Bad input gets a clear OpenAI-shaped 4xx, never a 500 or a stack trace."""

from __future__ import annotations

import httpx
import pytest

from veil.testing import TEST_KEY, PolicyKit, ServerThread, policy_toml

AUTH = {"authorization": f"Bearer {TEST_KEY}"}
CHAT = "/v1/chat/completions"
OK = '{"model": "mock-model", "messages": [{"role": "user", "content": "x"}]'


def _post(
    gw: ServerThread, path: str, content: bytes | str, headers: dict[str, str] | None = None
) -> httpx.Response:
    h = {**AUTH, "content-type": "application/json", **(headers or {})}
    return httpx.post(gw.url + path, content=content, headers=h, timeout=10)


def _assert_error(
    r: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert r.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "mock-model"}', "messages"),
        ('{"model": "mock-model", "messages": []}', "messages"),
        ('{"model": "mock-model", "messages": "hi"}', "messages"),
        ('{"model": "mock-model", "messages": [{"role": "user"}]}', "messages[0].content"),
        (
            '{"model": "mock-model", "messages": [{"role": "wizard", "content": "x"}]}',
            "messages[0].role",
        ),
        (
            '{"model": "mock-model", "messages": [{"role": "user", "content": 5}]}',
            "messages[0].content",
        ),
        ('{"messages": [{"role": "user", "content": "x"}]}', "model"),
        ('{"model": "", "messages": [{"role": "user", "content": "x"}]}', "model"),
        ('{"model": 7, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (
            OK + ', "stream": "yes"}',
            "stream",
        ),
        (
            OK + ', "max_tokens": -1}',
            "max_tokens",
        ),
        (
            OK + ', "temperature": 9}',
            "temperature",
        ),
        (OK + ', "n": "2"}', "n"),
        (
            OK + ', "tools": [{}]}',
            "tools[0]",
        ),
        (
            OK + ', "response_format": {"type": "xml"}}',
            "response_format",
        ),
        (
            '{"model": "mock-model", "messages": [{"role": "tool", "content": "x"}]}',
            "messages[0].tool_call_id",
        ),
    ],
)
def test_invalid_chat_bodies_are_400(gateway: ServerThread, body: str, param: str) -> None:
    _assert_error(_post(gateway, CHAT, body), 400, param=param)


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", '"text"', "", "null", "\xff\xfe"])
def test_malformed_json_is_400(gateway: ServerThread, body: str) -> None:
    _assert_error(_post(gateway, CHAT, body.encode("latin-1")), 400)


def test_unknown_model_is_404(gateway: ServerThread) -> None:
    r = _post(gateway, CHAT, '{"model": "gpt-99", "messages": [{"role": "user", "content": "x"}]}')
    _assert_error(r, 404, "model_not_found", "model")


def test_unsupported_content_type_is_415(gateway: ServerThread) -> None:
    r = _post(gateway, CHAT, "model=x", {"content-type": "application/x-www-form-urlencoded"})
    _assert_error(r, 415, "unsupported_content_type")


def test_body_over_the_policy_limit_is_413(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    gw = start_gateway(policy_kit.write(policy_toml(gateway={"max_body_bytes": 1000})))
    big = '{"model": "mock-model", "messages": [{"role": "user", "content": "' + "x" * 2000 + '"}]}'
    _assert_error(_post(gw, CHAT, big), 413, "request_too_large")

    def chunks():  # no content-length: chunked upload, still bounded
        yield big.encode()

    r = httpx.post(
        gw.url + CHAT, content=chunks(), headers={**AUTH, "content-type": "application/json"}
    )
    _assert_error(r, 413, "request_too_large")


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"authorization": "Bearer sk-veil-nope"}, "invalid_api_key"),
        ({"authorization": "Basic abc"}, "missing_api_key"),
    ],
)
def test_missing_or_wrong_key_is_401(
    gateway: ServerThread, headers: dict[str, str], code: str
) -> None:
    r = httpx.post(
        gateway.url + CHAT, json={"model": "mock-model", "messages": []}, headers=headers
    )
    _assert_error(r, 401, code)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "mock-embed"}', "input"),
        ('{"model": "mock-embed", "input": 5}', "input"),
        ('{"model": "mock-embed", "input": []}', "input"),
        ('{"model": "mock-embed", "input": "x", "encoding_format": "hex"}', "encoding_format"),
    ],
)
def test_invalid_embeddings_are_400(gateway: ServerThread, body: str, param: str) -> None:
    _assert_error(_post(gateway, "/v1/embeddings", body), 400, param=param)


def test_unknown_route_and_wrong_method(gateway: ServerThread) -> None:
    _assert_error(httpx.get(gateway.url + "/v1/nothing", headers=AUTH), 404)
    _assert_error(httpx.get(gateway.url + CHAT, headers=AUTH), 405)


def test_admin_routes_need_an_admin_key(gateway: ServerThread) -> None:
    from veil.testing import ADMIN_KEY

    _assert_error(httpx.get(gateway.url + "/-/plugins"), 401)
    _assert_error(httpx.get(gateway.url + "/-/plugins", headers=AUTH), 403)
    r = httpx.get(gateway.url + "/-/plugins", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200 and r.json()["object"] == "list"


def test_health_ready_and_metrics(gateway: ServerThread) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["policy_version"] == 1
    _post(gateway, CHAT, '{"model": "mock-model", "messages": [{"role": "user", "content": "x"}]}')
    _post(gateway, CHAT, '{"model": "nope", "messages": [{"role": "user", "content": "x"}]}')
    text = httpx.get(gateway.url + "/metrics").text
    assert 'veil_requests_total{endpoint="chat",model="mock-model",status="200"} 1.0' in text
    assert 'veil_requests_total{endpoint="chat",model="",status="404"} 1.0' in text
    assert "veil_gateway_overhead_seconds_bucket" in text
    assert "nope" not in text  # user-supplied strings never become labels


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v1/models", "/nowhere"])
def test_every_response_carries_a_request_id(gateway: ServerThread, path: str) -> None:
    assert httpx.get(gateway.url + path, headers=AUTH).headers["x-request-id"]


def test_stream_flag_on_embeddings_is_ignored(gateway: ServerThread) -> None:
    r = _post(gateway, "/v1/embeddings", '{"model": "mock-embed", "input": "x", "stream": true}')
    assert r.status_code == 200 and r.json()["object"] == "list"
