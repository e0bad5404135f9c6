"""Hot reload, SIGHUP, refusals at start-up, and rollback across restarts."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import openai
import pytest

from veil.testing import TEST_KEY, GatewayProcess, PolicyKit, ServerThread, policy_toml

MSG = [{"role": "user", "content": "hi"}]


def _deps(*names: str, latency_ms: int = 0) -> list[dict[str, object]]:
    return [
        {"name": n, "provider": "mock", "model": f"m-{n}", "options": {"latency_ms": latency_ms}}
        for n in names
    ]


def _version(url: str) -> int:
    return httpx.get(url + "/readyz").json()["policy_version"]


def _wait_version(url: str, version: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _version(url) != version:
        assert time.monotonic() < deadline, f"policy version {version} never came into force"
        time.sleep(0.05)


def test_hot_reload_under_concurrent_load_fails_no_request(
    policy_kit: PolicyKit, start_gateway
) -> None:  # noqa: ANN001
    path = policy_kit.write(policy_toml(version=1, deployments=_deps("stable", "old")))
    gw = start_gateway(path)
    stop = threading.Event()
    results: list[int] = []

    async def load() -> None:
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0
        ) as c:

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        if len(results) % 2:
                            await c.chat.completions.create(model="stable", messages=MSG)
                        else:
                            s = await c.chat.completions.create(
                                model="stable", messages=MSG, stream=True
                            )
                            [x async for x in s]
                        results.append(200)
                    except openai.APIError as e:
                        results.append(getattr(e, "status_code", -1) or -1)

            await asyncio.gather(*(worker() for _ in range(16)))

    loader = threading.Thread(target=asyncio.run, args=(load(),))
    loader.start()
    try:
        for version in (2, 3, 4):
            time.sleep(0.4)
            policy_kit.write(
                policy_toml(version=version, deployments=_deps("stable", f"new{version}"))
            )
            _wait_version(gw.url, version)
        time.sleep(0.3)
    finally:
        stop.set()
        loader.join(30)
    assert len(results) > 50
    assert set(results) == {200}, f"{sum(r != 200 for r in results)} of {len(results)} failed"
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY) as c:
        assert {m.id for m in c.models.list()} == {"stable", "new4"}


def test_refused_reload_keeps_the_old_policy(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    path = policy_kit.write(policy_toml(version=2, deployments=_deps("kept")))
    gw = start_gateway(path, watch_interval=0)
    # tampered: signed, then edited
    policy_kit.write(policy_toml(version=3, deployments=_deps("evil")))
    path.write_text(path.read_text().replace("m-evil", "m-evil2"))
    assert gw.call(gw.gateway.reload()) is False
    # rolled back: a validly signed, older version
    policy_kit.write(policy_toml(version=1, deployments=_deps("old")))
    assert gw.call(gw.gateway.reload()) is False
    # a plugin the policy names is missing
    policy_kit.write(policy_toml(version=5, pipeline=["not-installed"]))
    assert gw.call(gw.gateway.reload()) is False
    assert _version(gw.url) == 2
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY) as c:
        assert c.chat.completions.create(model="kept", messages=MSG).choices
    assert 'veil_policy_reloads_total{result="refused"} 3.0' in httpx.get(gw.url + "/metrics").text


def test_calls_in_flight_finish_under_the_policy_they_started_with(
    policy_kit: PolicyKit,
    start_gateway,  # noqa: ANN001
) -> None:
    path = policy_kit.write(policy_toml(version=1, deployments=_deps("slow", latency_ms=800)))
    gw = start_gateway(path, watch_interval=0)
    out: dict[str, object] = {}

    def slow_call() -> None:
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as c:
            out["answer"] = c.chat.completions.create(model="slow", messages=MSG)

    t = threading.Thread(target=slow_call)
    t.start()
    time.sleep(0.3)
    policy_kit.write(policy_toml(version=2, deployments=_deps("fast")))
    assert gw.call(gw.gateway.reload()) is True
    t.join(10)
    assert out["answer"].choices[0].message.content  # type: ignore[attr-defined]
    with (
        openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY) as c,
        pytest.raises(openai.NotFoundError),
    ):
        c.chat.completions.create(model="slow", messages=MSG)


def test_sighup_reloads_the_policy(policy_kit: PolicyKit) -> None:
    path = policy_kit.write(policy_toml(version=1))
    with GatewayProcess(
        path,
        policy_kit.public_key_path,
        state_dir=policy_kit.state_dir,
        extra_args=["--watch-interval", "0"],
    ) as gw:
        policy_kit.write(policy_toml(version=2))
        gw.send_signal(signal.SIGHUP)
        _wait_version(gw.url, 2)
        assert '"event": "policy_accepted"' in gw.output()


@pytest.mark.parametrize(
    ("text", "sign", "code", "message"),
    [
        (policy_toml(), False, 3, "unsigned"),
        (policy_toml(expires_at="2021-01-01T00:00:00Z"), True, 3, "expired"),
        (policy_toml(audience="production"), True, 3, "audience 'production'"),
        (
            policy_toml(pipeline=["not-installed"]),
            True,
            4,
            "'not-installed' is named by the policy",
        ),
    ],
    ids=["unsigned", "expired", "wrong-audience", "missing-plugin"],
)
def test_refused_policy_stops_start_up(
    policy_kit: PolicyKit, text: str, sign: bool, code: int, message: str
) -> None:
    gw = GatewayProcess(policy_kit.write(text, sign=sign), policy_kit.public_key_path)
    try:
        assert gw.wait(30) == code
        assert message in gw.output()
    finally:
        gw.stop()


def test_rollback_is_refused_across_a_restart(policy_kit: PolicyKit) -> None:
    v2 = policy_kit.write(policy_toml(version=2), name="v2.toml")
    with GatewayProcess(v2, policy_kit.public_key_path, state_dir=policy_kit.state_dir):
        pass
    v1 = policy_kit.write(policy_toml(version=1), name="v1.toml")
    gw = GatewayProcess(v1, policy_kit.public_key_path, state_dir=policy_kit.state_dir)
    try:
        assert gw.wait(30) == 3
        assert "version 1 is lower than version 2" in gw.output()
    finally:
        gw.stop()


def test_expired_policy_in_force_refuses_calls(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    gw: ServerThread = start_gateway(policy_kit.write(policy_toml()), watch_interval=0)
    gw.gateway.runtime.expires_ts = time.time() - 1  # the clock passed expires_at
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {TEST_KEY}"},
        json={"model": "mock-model", "messages": MSG},
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "policy_expired"
    assert httpx.get(gw.url + "/readyz").status_code == 503
