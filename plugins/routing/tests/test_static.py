"""Static routing through the real gateway: aliases, weighted splits, rules on
team / key tags / metadata / message text, the capability filter and the
context window, the reason header, the audit decisions, and settings refused
with the field named."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import openai
import pytest
from routingtest import TAGGED_KEY, Recorder, chat, client, mock_dep, routing_policy, start_error

from veil.errors import PluginError, PolicyError
from veil.testing import OTHER_KEY, TEST_KEY, PolicyKit, ServerThread

Gateway = Callable[..., ServerThread]

DEPS = [
    mock_dep("small", context_window=60),
    mock_dep("large", context_window=100_000),
    mock_dep("notools"),
    mock_dep("nojson"),
    mock_dep("team-test-only", teams=["test"]),
]


def test_alias_maps_to_its_first_target_and_says_why(
    routing_gateway: Gateway, recorder: Recorder
) -> None:
    gw = routing_gateway(DEPS, {"aliases": {"fast": {"targets": ["large", "small"]}}})
    answer, headers = chat(gw, "fast")
    assert answer.model == "up-large"
    assert headers["x-veil-model"] == "large"
    assert headers["x-veil-route"] == "alias=fast; deployment=large"
    [decision] = recorder.routing_decisions()
    assert decision["action"] == "routed"
    assert decision["target"] == "fast"
    assert decision["deployments"] == ["large", "small"]


def test_plain_model_is_routed_to_its_own_deployment(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {})
    answer, headers = chat(gw, "large")
    assert answer.model == "up-large"
    assert headers["x-veil-route"] == "model=large; deployment=large"


def test_unknown_model_is_still_a_404(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {})
    with pytest.raises(openai.NotFoundError) as e:
        chat(gw, "nope")
    assert e.value.code == "model_not_found"


def test_weighted_split_follows_the_weights(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        DEPS, {"aliases": {"split": {"targets": ["large", "small"], "weights": [3, 1]}}}
    )
    counts: collections.Counter[str] = collections.Counter()
    n = 400
    for _ in range(n):
        _, headers = chat(gw, "split", "hi")
        counts[headers["x-veil-model"]] += 1
    # expected 300 / 100; the binomial standard deviation is about 8.7
    assert 250 <= counts["large"] <= 350
    assert counts["large"] + counts["small"] == n


def test_weight_zero_target_is_only_a_fallback(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        DEPS, {"aliases": {"split": {"targets": ["large", "small"], "weights": [0, 1]}}}
    )
    seen = {chat(gw, "split")[1]["x-veil-model"] for _ in range(30)}
    assert seen == {"small"}


def test_rule_on_team(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {"rules": [{"id": "others", "teams": ["other"], "route": "small"}]})
    assert chat(gw, "large", key=OTHER_KEY)[0].model == "up-small"
    _, headers = chat(gw, "large", key=OTHER_KEY)
    assert headers["x-veil-route"] == "rule=others; model=small; deployment=small"
    assert chat(gw, "large", key=TEST_KEY)[0].model == "up-large"


def test_rule_on_key_tags(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {"rules": [{"key_tags": ["batch"], "route": "small"}]})
    assert chat(gw, "large", key=TAGGED_KEY)[0].model == "up-small"
    assert chat(gw, "large", key=TEST_KEY)[0].model == "up-large"


def test_rule_on_request_metadata(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {"rules": [{"metadata": {"tier": "gold"}, "route": "large"}]})
    assert chat(gw, "small", metadata={"tier": "gold"})[0].model == "up-large"
    assert chat(gw, "small", metadata={"tier": "silver"})[0].model == "up-small"
    assert chat(gw, "small")[0].model == "up-small"


def test_rule_on_message_regex(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        DEPS, {"rules": [{"pattern": r"\bdef \w+\(", "route": "large", "id": "code"}]}
    )
    assert chat(gw, "small", "why does def foo(x): fail")[0].model == "up-large"
    assert chat(gw, "small", "define foo")[0].model == "up-small"


def test_rule_on_keywords_matches_whole_words_in_any_case(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        DEPS, {"rules": [{"keywords": ["refund", "chargeback"], "route": "large"}]}
    )
    assert chat(gw, "small", "I want a REFUND now")[0].model == "up-large"
    assert chat(gw, "small", "refunded already")[0].model == "up-small"


def test_rule_looks_at_the_last_user_message_only(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {"rules": [{"keywords": ["refund"], "route": "large"}]})
    answer = client(gw).chat.completions.create(
        model="small",
        messages=[
            {"role": "user", "content": "refund"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
        ],
    )
    assert answer.model == "up-small"


def test_rule_conditions_must_all_hold_and_first_match_wins(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        DEPS,
        {
            "rules": [
                {"teams": ["other"], "keywords": ["urgent"], "route": "large"},
                {"models": ["notools"], "route": "small"},
                {"route": "nojson"},
            ]
        },
    )
    assert chat(gw, "small", "urgent", key=OTHER_KEY)[0].model == "up-large"
    assert chat(gw, "small", "urgent", key=TEST_KEY)[0].model == "up-nojson"
    assert chat(gw, "notools", "urgent", key=TEST_KEY)[0].model == "up-small"


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]


def test_capability_filter_skips_models_without_tools(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        DEPS,
        {
            "aliases": {"a": {"targets": ["notools", "large"]}},
            "models": {"notools": {"tools": False}},
        },
    )
    answer, headers = chat(gw, "a", tools=TOOLS)
    assert answer.model == "up-large"
    assert chat(gw, "a")[0].model == "up-notools"
    with pytest.raises(openai.BadRequestError) as e:
        chat(gw, "notools", tools=TOOLS)
    assert e.value.code == "unsupported_capability"
    assert e.value.body["param"] == "tools"  # type: ignore[index]


def test_capability_filter_skips_models_without_json_mode(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        DEPS,
        {
            "aliases": {"a": {"targets": ["nojson", "large"]}},
            "models": {"nojson": {"json_mode": False}},
        },
    )
    fmt: Any = {"type": "json_object"}
    assert chat(gw, "a", "give json", response_format=fmt)[0].model == "up-large"
    assert chat(gw, "a")[0].model == "up-nojson"
    with pytest.raises(openai.BadRequestError) as e:
        chat(gw, "nojson", "json please", response_format=fmt)
    assert e.value.code == "unsupported_capability"


def test_context_window_too_small_is_skipped(routing_gateway: Gateway, recorder: Recorder) -> None:
    gw = routing_gateway(DEPS, {"aliases": {"a": {"targets": ["small", "large"]}}})
    assert chat(gw, "a", "short")[0].model == "up-small"
    long_text = "word " * 200  # about 250 tokens: over small's 60
    assert chat(gw, "a", long_text)[0].model == "up-large"
    # the requested output counts too
    assert chat(gw, "a", "short", max_tokens=100)[0].model == "up-large"
    assert recorder.routing_decisions()[1]["deployments"] == ["large"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(gw, "small", long_text)
    assert e.value.code == "context_length_exceeded"


def test_context_window_can_be_set_in_the_routing_section(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        DEPS,
        {
            "aliases": {"a": {"targets": ["notools", "large"]}},
            "models": {"notools": {"context_window": 20}},
        },
    )
    assert chat(gw, "a", "word " * 40)[0].model == "up-large"


def test_team_restricted_deployments_are_skipped(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {"aliases": {"a": {"targets": ["team-test-only", "large"]}}})
    assert chat(gw, "a", key=TEST_KEY)[0].model == "up-team-test-only"
    assert chat(gw, "a", key=OTHER_KEY)[0].model == "up-large"


def test_streams_are_routed_too(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {"aliases": {"fast": {"targets": ["large"]}}})
    with client(gw).chat.completions.with_streaming_response.create(
        model="fast", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as resp:
        assert resp.headers["x-veil-route"] == "alias=fast; deployment=large"
        models = {chunk.model for chunk in resp.parse()}
    assert models == {"up-large"}


def test_embeddings_follow_aliases(routing_gateway: Gateway) -> None:
    gw = routing_gateway(
        [*DEPS, mock_dep("emb", "mock-embed")], {"aliases": {"vectors": {"targets": ["emb"]}}}
    )
    result = client(gw).embeddings.create(model="vectors", input="hello")
    assert len(result.data[0].embedding) > 0


def test_bad_strategy_header_is_an_openai_400(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {})
    with pytest.raises(openai.BadRequestError) as e:
        chat(gw, "large", headers={"x-veil-route-strategy": "cheapest-please"})
    assert e.value.code == "invalid_route_strategy"
    assert e.value.body["param"] == "x-veil-route-strategy"  # type: ignore[index]
    assert "floor:0.7" in e.value.message


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"aliases": {"a": {"targets": ["large"], "weights": [1, 2]}}}, "aliases.a"),
        ({"rules": [{"pattern": "(unclosed", "route": "large"}]}, "rules.0.pattern"),
        ({"strategy": "fastest"}, "strategy"),
        ({"balance": "random"}, "balance"),
        ({"breaker": {"failures": 0}}, "breaker.failures"),
        ({"pools": {"p": {"models": ["large"]}}}, "router"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_section_is_refused_naming_the_field(
    policy_kit: PolicyKit, section: dict[str, Any], expected: str
) -> None:
    import veil_routing

    path = policy_kit.write(routing_policy(DEPS, section, pipeline=["routing"]))
    error = start_error(policy_kit, path, {"routing": veil_routing})
    assert isinstance(error, PolicyError)
    assert "section [routing] is invalid" in str(error)
    assert expected in str(error)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"aliases": {"a": {"targets": ["ghost"]}}}, "[routing.aliases.a] targets names 'ghost'"),
        ({"rules": [{"route": "ghost"}]}, "route 'ghost'"),
        ({"rules": [{"teams": ["nobody"], "route": "large"}]}, "teams names 'nobody'"),
        ({"aliases": {"large": {"targets": ["small"]}}}, "'large' is both a policy model"),
    ],
)
def test_names_unknown_to_the_policy_stop_start_up(
    policy_kit: PolicyKit, section: dict[str, Any], expected: str
) -> None:
    import veil_routing

    path = policy_kit.write(routing_policy(DEPS, section, pipeline=["routing"]))
    error = start_error(policy_kit, path, {"routing": veil_routing})
    assert isinstance(error, PluginError)
    assert expected in str(error)


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        (r"\bdef \w+\(", ("def ", False)),
        (r"(?i)refund", ("refund", True)),
        (r"abc*", (None, False)),
        (r"foo|bar", (None, False)),
        (r"hello+ world", ("hello", False)),
        (r"abcd?e", ("abc", False)),
        (r"\d+", (None, False)),
    ],
)
def test_regex_prefilter_literal_is_only_what_every_match_contains(
    pattern: str, literal: tuple[str | None, bool]
) -> None:
    from veil_routing.rules import leading_literal

    assert leading_literal(pattern) == literal


def test_case_insensitive_pattern_rule(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {"rules": [{"pattern": "(?i)stack ?trace", "route": "large"}]})
    assert chat(gw, "small", "here is my STACKTRACE")[0].model == "up-large"
    assert chat(gw, "small", "a stack of traces")[0].model == "up-small"


def test_a_team_without_access_gets_a_404_not_a_capability_error(routing_gateway: Gateway) -> None:
    gw = routing_gateway(DEPS, {"models": {"team-test-only": {"tools": False}}})
    with pytest.raises(openai.NotFoundError):
        chat(gw, "team-test-only", key=OTHER_KEY, tools=TOOLS)
    with pytest.raises(openai.BadRequestError):
        chat(gw, "team-test-only", key=TEST_KEY, tools=TOOLS)
