"""veil-cache in a real gateway: the official SDK in front, ``veil mock-upstream``
(which counts requests) behind."""

from __future__ import annotations

import re
from collections.abc import Callable

import openai
import pytest
from cachetest import admin, ask, ask_stream, cache_stage, client, upstream_requests, user

from veil.testing import OTHER_KEY, TEST_KEY, ServerThread

Start = Callable[..., ServerThread]
Q = "What are the opening hours of the main library on Sundays?"


def test_same_request_twice_is_a_hit_and_the_upstream_is_called_once(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway()
    first_header, first = ask(gw, Q)
    second_header, second = ask(gw, Q)
    assert (first_header, second_header) == ("miss", "hit")
    assert upstream_requests(mock_upstream) == 1
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.id != first.id and re.fullmatch(r"chatcmpl-[0-9a-f]{24}", second.id)
    with client(gw, TEST_KEY) as c:
        third = c.chat.completions.create(
            model="mock-model",
            temperature=0,
            messages=user(Q),
            extra_headers={"x-request-id": "r1"},
        )
    assert third.id not in (second.id, "chatcmpl-r1")  # unique, never the client's request id
    assert second.created >= first.created
    assert second.usage is not None and second.usage == first.usage


def test_another_team_with_the_same_request_misses(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway()
    assert ask(gw, Q)[0] == "miss"
    assert ask(gw, Q, key=OTHER_KEY)[0] == "miss"
    assert ask(gw, Q, key=OTHER_KEY)[0] == "hit"
    assert ask(gw, Q)[0] == "hit"
    assert upstream_requests(mock_upstream) == 2


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 17},
        {"model": "other-model"},
        {"seed": 7},
        {"stop": ["\n"]},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    ],
    ids=["max_tokens", "model", "seed", "stop", "response_format", "tools"],
)
def test_a_changed_parameter_misses(
    cache_gateway: Start, mock_upstream: ServerThread, change: dict[str, object]
) -> None:
    gw = cache_gateway()
    assert ask(gw, Q)[0] == "miss"
    assert ask(gw, Q, **change)[0] == "miss"
    assert ask(gw, Q, **change)[0] == "hit"
    assert upstream_requests(mock_upstream) == 2


def test_fields_that_do_not_change_the_answer_share_the_entry(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway()
    assert ask(gw, Q, user="alice")[0] == "miss"
    assert ask(gw, Q, user="bob", metadata={"ticket": "42"})[0] == "hit"
    header, text, _ = ask_stream(gw, Q, user="carol")
    assert header == "hit"
    assert upstream_requests(mock_upstream) == 1


def test_sampled_calls_bypass_the_cache_unless_the_policy_allows_them(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway()
    for temperature in (None, 0.7, 0.7):
        params = {} if temperature is None else {"temperature": temperature}
        with client(gw) as c:
            raw = c.chat.completions.with_raw_response.create(
                model="mock-model", messages=user(Q), **params
            )
        assert raw.headers["x-veil-cache"] == "bypass"
    assert upstream_requests(mock_upstream) == 3
    relaxed = cache_gateway(any_temperature=True)
    assert ask(relaxed, Q, temperature=0.7)[0] == "miss"
    assert ask(relaxed, Q, temperature=0.7)[0] == "hit"
    assert ask(relaxed, Q, temperature=0.2)[0] == "miss"


def test_client_cache_control(cache_gateway: Start, mock_upstream: ServerThread) -> None:
    gw = cache_gateway()
    # no-store: neither looked up nor stored
    assert ask(gw, Q, headers={"Cache-Control": "no-store"})[0] == "bypass"
    assert ask(gw, Q, headers={"Cache-Control": "no-store"})[0] == "bypass"
    assert upstream_requests(mock_upstream) == 2
    # x-veil-cache: bypass, the same
    assert ask(gw, Q, headers={"x-veil-cache": "bypass"})[0] == "bypass"
    assert upstream_requests(mock_upstream) == 3
    # no-cache: not looked up, but the fresh answer is stored for the next caller
    assert ask(gw, Q, headers={"Cache-Control": "no-cache"})[0] == "miss"
    assert ask(gw, Q, headers={"Cache-Control": "no-cache"})[0] == "miss"
    assert upstream_requests(mock_upstream) == 5
    assert ask(gw, Q)[0] == "hit"
    assert ask(gw, Q, headers={"x-veil-cache": "bypass"})[0] == "bypass"
    assert upstream_requests(mock_upstream) == 6


def test_an_unknown_x_veil_cache_value_is_a_400(cache_gateway: Start) -> None:
    gw = cache_gateway()
    with client(gw) as c, pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="mock-model",
            messages=user(Q),
            temperature=0,
            extra_headers={"x-veil-cache": "please"},
        )
    assert e.value.status_code == 400 and e.value.code == "invalid_cache_header"


def test_embeddings_calls_say_bypass(cache_gateway: Start) -> None:
    gw = cache_gateway()
    with client(gw) as c:
        raw = c.embeddings.with_raw_response.create(model="mock-model", input="hello")
    assert raw.headers["x-veil-cache"] == "bypass"


# -- streams --------------------------------------------------------------------------


def test_a_stream_hit_replays_the_original_stream_with_usage(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway()
    h1, text1, chunks1 = ask_stream(gw, Q, usage=True)
    h2, text2, chunks2 = ask_stream(gw, Q, usage=True)
    assert (h1, h2) == ("miss", "hit")
    assert text1 and text2 == text1
    assert upstream_requests(mock_upstream) == 1
    counts = [
        [(u.prompt_tokens, u.completion_tokens, u.total_tokens) for c in chunks if (u := c.usage)]
        for chunks in (chunks1, chunks2)
    ]
    assert len(counts[1]) == 1 and counts[1] == counts[0]
    assert chunks2[0].id != chunks1[0].id
    finish = [ch.choices[0].finish_reason for ch in chunks2 if ch.choices]
    assert finish[-1] == "stop"
    # without include_usage: no usage chunk
    h3, text3, chunks3 = ask_stream(gw, Q)
    assert h3 == "hit" and text3 == text1 and not any(c.usage for c in chunks3)
    # a stored stream also answers a plain call, and the other way round
    assert ask(gw, Q)[1].choices[0].message.content == text1
    assert ask(gw, "plain first")[0] == "miss"
    h4, text4, _ = ask_stream(gw, "plain first")
    assert h4 == "hit" and text4 == ask(gw, "plain first")[1].choices[0].message.content
    assert upstream_requests(mock_upstream) == 2


def test_tool_calls_stored_from_a_plain_call_are_replayed_to_a_stream(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    params = {"tools": tools, "tool_choice": "required"}
    with client(gw) as c:
        # a streamed tool call is served, not stored (it is stored from plain calls)
        first = c.chat.completions.create(
            model="mock-model", messages=user(Q), temperature=0, stream=True, **params
        )
        streamed = [tc for ch in first if ch.choices for tc in ch.choices[0].delta.tool_calls or ()]
        assert streamed
        raw = c.chat.completions.with_raw_response.create(
            model="mock-model", messages=user(Q), temperature=0, **params
        )
        assert raw.headers["x-veil-cache"] == "miss"
        plain = raw.parse()
        replay = c.chat.completions.create(
            model="mock-model", messages=user(Q), temperature=0, stream=True, **params
        )
        replayed = [
            tc for ch in replay if ch.choices for tc in ch.choices[0].delta.tool_calls or ()
        ]
    assert upstream_requests(mock_upstream) == 2
    (tool_call,) = plain.choices[0].message.tool_calls or []
    assert plain.choices[0].finish_reason == "tool_calls"
    (again,) = replayed
    assert again.function is not None and again.function.name == "lookup"
    assert again.function.arguments == tool_call.function.arguments
    assert again.id == tool_call.id


def test_a_streamed_answer_cut_by_its_output_cap_is_stored_as_length(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway()
    long_q = "Tell me everything about " + "the history of the printing press " * 10
    h1, text1, _ = ask_stream(gw, long_q, max_tokens=5)
    h2, answer = ask(gw, long_q, max_tokens=5)
    assert (h1, h2) == ("miss", "hit")
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content == text1
    assert answer.usage is not None and answer.usage.completion_tokens == 5


# -- admin ------------------------------------------------------------------------------


def test_admin_stats_and_delete_by_team_or_all(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    gw = cache_gateway()
    ask(gw, Q)
    ask(gw, Q)
    ask(gw, Q, key=OTHER_KEY)
    stats = admin(gw, "GET").json()
    assert stats["store"] == "memory"
    assert stats["entries"] == 2 and stats["hits"] == 1 and stats["misses"] == 2
    assert 0 < stats["bytes"] <= stats["max_bytes"]
    assert admin(gw, "GET", key=TEST_KEY).status_code == 403
    assert admin(gw, "DELETE", key=TEST_KEY).status_code == 403
    r = admin(gw, "DELETE", team="other")
    assert r.status_code == 200 and r.json() == {"deleted": 1, "team": "other"}
    assert ask(gw, Q)[0] == "hit"
    assert ask(gw, Q, key=OTHER_KEY)[0] == "miss"
    assert admin(gw, "DELETE").json()["deleted"] == 2
    assert ask(gw, Q)[0] == "miss"
    bad = admin(gw, "DELETE", team="")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "team"


# -- bounds ------------------------------------------------------------------------------


def test_the_memory_store_never_exceeds_its_byte_limit_under_a_flood(
    cache_gateway: Start, mock_upstream: ServerThread
) -> None:
    limit = 64 * 1024
    gw = cache_gateway(max_bytes=limit, max_entries=10_000, max_entry_bytes=16 * 1024)
    stage = cache_stage(gw)
    for i in range(60):
        text = f"request {i}: " + ("lorem ipsum dolor sit amet " * 200)  # ~5.4 kB answer each
        assert ask(gw, text)[0] == "miss"
        assert stage.store.bytes <= limit
    assert len(stage.store._entries) < 60  # the oldest went
    # the most recent is still there, the first is gone
    assert ask(gw, "request 59: " + ("lorem ipsum dolor sit amet " * 200))[0] == "hit"
    assert ask(gw, "request 0: " + ("lorem ipsum dolor sit amet " * 200))[0] == "miss"
    # an answer over max_entry_bytes is served, not stored
    huge = "x " * 20_000
    assert ask(gw, huge)[0] == "miss"
    assert ask(gw, huge)[0] == "miss"
    assert stage.store.bytes <= limit


# -- command line -------------------------------------------------------------------------


def test_veil_cache_stats_and_clear_talk_to_a_running_gateway(cache_gateway: Start) -> None:
    import json

    from click.testing import CliRunner
    from veil_cache.cli import cache

    from veil.testing import ADMIN_KEY

    gw = cache_gateway()
    ask(gw, Q)
    ask(gw, Q)
    runner = CliRunner()
    stats = runner.invoke(cache, ["stats", "--url", gw.url, "--key", ADMIN_KEY, "--json"])
    assert stats.exit_code == 0, stats.output
    doc = json.loads(stats.output)
    assert doc["entries"] == 1 and doc["hits"] == 1
    text = runner.invoke(cache, ["stats", "--url", gw.url, "--key", ADMIN_KEY])
    assert "hits" in text.output and "entries" in text.output
    cleared = runner.invoke(cache, ["clear", "--url", gw.url, "--key", ADMIN_KEY, "--team", "test"])
    assert cleared.exit_code == 0 and "deleted 1 entries of team test" in cleared.output
    refused = runner.invoke(cache, ["stats", "--url", gw.url, "--key", TEST_KEY])
    assert refused.exit_code == 1 and "403" in refused.output
    gone = runner.invoke(cache, ["stats", "--url", "http://127.0.0.1:9", "--key", ADMIN_KEY])
    assert gone.exit_code == 1 and "cannot reach the gateway" in gone.output
    key = runner.invoke(cache, ["keygen"]).output.strip()
    assert len(key) == 44
