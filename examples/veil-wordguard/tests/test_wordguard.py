"""Tests of veil-wordguard: the guard logic alone, then the plugin in a real
gateway driven by the official ``openai`` SDK (fixtures from ``veil.testing``)."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import ValidationError
from veil import BadRequest, Call, PluginError, Principal
from veil.errors import PolicyError
from veil.metrics import Metrics
from veil.policy import parse_policy
from veil.runtime import Runtime
from veil.testing import TEST_KEY, PolicyKit, ServerThread, policy_toml

import veil_wordguard
from veil_wordguard.guard import WordGuard, WordGuardSettings, compile_terms, texts_to_check
from veil_wordguard.stage import BLOCKED_MESSAGE, HEADER, WordGuardStage

PROJECT = Path(__file__).resolve().parent.parent
BLOCKED = ["pineapple", "Project Zeus"]


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# -- the guard logic, no gateway --------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I like pineapple",
        "PINEAPPLE!",
        "Pineapple, please.",
        "(pineapple)",
        "about project   zeus today",
        "project\nZEUS",
    ],
)
def test_blocked_terms_match_whole_words_in_any_case(text: str) -> None:
    assert WordGuard(BLOCKED).count(text) == 1


@pytest.mark.parametrize(
    "text", ["pineapples", "pineapple_juice", "apineapple", "project zeuss", "projectzeus", ""]
)
def test_terms_inside_longer_words_do_not_match(text: str) -> None:
    assert WordGuard(BLOCKED).count(text) == 0


def test_every_occurrence_is_counted() -> None:
    assert WordGuard(BLOCKED).count("pineapple and Pineapple and project zeus") == 3


def test_matching_uses_full_case_folding() -> None:
    assert WordGuard(["straße"]).count("STRASSE") == 1


def test_terms_with_punctuation_are_matched_literally() -> None:
    guard = WordGuard(["c++", "a.b"])
    assert guard.count("I write C++ daily") == 1
    assert guard.count("aXb") == 0
    assert guard.count("a.b") == 1


def test_no_terms_means_no_pattern_and_nothing_blocked() -> None:
    assert compile_terms([]) is None
    assert compile_terms(["  "]) is None
    assert WordGuard([]).count_request({"messages": [user("pineapple")]}) == 0


def test_system_developer_user_text_and_text_parts_are_checked() -> None:
    request = {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "developer", "content": "dev"},
            user([{"type": "text", "text": "part"}, {"type": "image_url", "image_url": {}}]),
            {"role": "assistant", "content": "assistant text"},
            {"role": "tool", "content": "tool output", "tool_call_id": "t"},
            user(None),
            "not a message",
        ]
    }
    assert list(texts_to_check(request)) == ["sys", "dev", "part"]


def test_assistant_and_tool_messages_are_not_checked() -> None:
    request = {
        "messages": [
            {"role": "assistant", "content": "pineapple"},
            {"role": "tool", "content": "pineapple", "tool_call_id": "t"},
            user("hello"),
        ]
    }
    assert WordGuard(BLOCKED).count_request(request) == 0


def test_a_request_without_messages_has_nothing_to_check() -> None:
    assert list(texts_to_check({"input": "pineapple"})) == []


def test_settings_defaults_block_nothing_and_add_the_header() -> None:
    settings = WordGuardSettings.model_validate({})
    assert settings.blocked == [] and settings.header is True


def test_settings_strip_terms() -> None:
    assert WordGuardSettings.model_validate({"blocked": [" zeus "]}).blocked == ["zeus"]


@pytest.mark.parametrize(
    "section",
    [
        {"blocked": 5},
        {"blocked": "pineapple"},
        {"blocked": [5]},
        {"blocked": [""]},
        {"header": "yes"},
        {"blockd": ["typo"]},
    ],
)
def test_invalid_settings_are_refused(section: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        WordGuardSettings.model_validate(section)


def _call(messages: list[dict[str, Any]], kind: str = "chat") -> Call:
    body = {"model": "mock-model", "messages": messages}
    return Call(
        id="req-1",
        kind=kind,  # type: ignore[arg-type]
        request=body,
        principal=Principal("test", "test"),
        policy=parse_policy(policy_toml().encode()),
        headers={},
    )


def test_stage_refuses_without_naming_the_term_and_records_a_count() -> None:
    stage = WordGuardStage(WordGuardSettings(blocked=BLOCKED))
    call = _call([{"role": "system", "content": "Project Zeus"}, user("pineapple pie")])
    with pytest.raises(BadRequest) as e:
        asyncio.run(stage.on_request(call))
    assert e.value.status == 400 and e.value.code == "blocked_word"
    assert e.value.message == BLOCKED_MESSAGE
    assert "pineapple" not in str(e.value).lower() and "zeus" not in str(e.value).lower()
    assert [(d.stage, d.action, dict(d.detail)) for d in call.decisions] == [
        ("wordguard", "blocked", {"count": 2})
    ]
    assert HEADER not in call.response_headers


def test_stage_marks_calls_it_lets_through() -> None:
    stage = WordGuardStage(WordGuardSettings(blocked=BLOCKED))
    call = _call([user("hello")])
    asyncio.run(stage.on_request(call))
    assert call.response_headers == {HEADER: "checked"} and call.decisions == []


def test_stage_header_can_be_turned_off() -> None:
    stage = WordGuardStage(WordGuardSettings(blocked=BLOCKED, header=False))
    call = _call([user("hello")])
    asyncio.run(stage.on_request(call))
    assert call.response_headers == {}


def test_stage_passes_embeddings_calls() -> None:
    stage = WordGuardStage(WordGuardSettings(blocked=BLOCKED))
    call = _call([], kind="embeddings")
    call.request = {"model": "mock-embed", "input": "pineapple"}
    asyncio.run(stage.on_request(call))
    assert call.response_headers == {HEADER: "checked"}


def test_package_declares_the_entry_point_and_its_version() -> None:
    meta = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "veil-wordguard"
    assert meta["entry-points"]["veil"] == {"wordguard": "veil_wordguard"}
    assert meta["version"] == veil_wordguard.__version__
    assert (PROJECT / "veil_wordguard" / "py.typed").is_file()


# -- the plugin in a gateway ---------------------------------------------------------


def _policy(**section: Any) -> str:
    return policy_toml(
        pipeline=["wordguard"],
        plugins={"wordguard": {"version": ">=0.1,<0.2"}},
        sections={"wordguard": {"blocked": BLOCKED, **section}},
    )


@pytest.fixture
def gateway(policy_kit: PolicyKit, start_gateway: Callable[..., ServerThread]) -> ServerThread:
    """A real gateway on 127.0.0.1 with wordguard loaded (no entry point needed)."""
    return start_gateway(policy_kit.write(_policy()), plugins={"wordguard": veil_wordguard})


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0) as c:
        yield c


def test_blocked_word_is_refused_with_400_blocked_word(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="mock-model", messages=[user("Tell me about PINEAPPLE pizza")]
        )
    assert e.value.status_code == 400 and e.value.code == "blocked_word"
    error = e.value.response.json()["error"]
    assert error == {
        "message": BLOCKED_MESSAGE,
        "type": "invalid_request_error",
        "param": "messages",
        "code": "blocked_word",
    }
    assert "pineapple" not in e.value.response.text.lower()


def test_blocked_phrase_in_a_system_text_part_is_refused(client: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": [{"type": "text", "text": "Re: project zeus"}]},
        user("hello"),
    ]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mock-model", messages=messages)
    assert e.value.code == "blocked_word"


def test_clean_call_passes_and_carries_the_header(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="mock-model", messages=[user("Tell me about apples")]
    )
    assert raw.headers["x-wordguard"] == "checked"
    assert "apples" in (raw.parse().choices[0].message.content or "")


def test_streaming_clean_call_passes_with_the_header(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="mock-model", messages=[user("Tell me about apples")], stream=True
    )
    assert raw.headers["x-wordguard"] == "checked"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert "apples" in text


def test_streaming_blocked_call_is_refused_before_any_chunk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="mock-model", messages=[user("pineapple")], stream=True
        )
    assert e.value.code == "blocked_word"


def test_header_off_in_the_policy(
    policy_kit: PolicyKit, start_gateway: Callable[..., ServerThread]
) -> None:
    gw = start_gateway(
        policy_kit.write(_policy(header=False)), plugins={"wordguard": veil_wordguard}
    )
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="mock-model", messages=[user("hello")]
        )
    assert "x-wordguard" not in raw.headers


def test_invalid_section_refuses_the_policy() -> None:
    bad = parse_policy(
        policy_toml(pipeline=["wordguard"], sections={"wordguard": {"blocked": 5}}).encode()
    )
    with pytest.raises(PolicyError, match=r"section \[wordguard\] is invalid: blocked"):
        Runtime.build(bad, Metrics(), {"wordguard": veil_wordguard})


def test_version_range_of_the_policy_is_checked() -> None:
    policy = parse_policy(
        policy_toml(pipeline=["wordguard"], plugins={"wordguard": {"version": ">=0.2"}}).encode()
    )
    with pytest.raises(PluginError, match="'wordguard' version 0.1.0"):
        Runtime.build(policy, Metrics(), {"wordguard": veil_wordguard})
