"""The policy decides which plugins run, in which order, and how they fail."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from veil import BadRequest, Call, Chunk, hookimpl
from veil.errors import PluginError, PolicyError
from veil.metrics import Metrics
from veil.policy import parse_policy
from veil.registry import StageRegistrar
from veil.runtime import Runtime
from veil.testing import TEST_KEY, PolicyKit, policy_toml

MSG = [{"role": "user", "content": "hello"}]


class Recorder:
    """A stage that records the order it sees things in a shared log."""

    def __init__(
        self, name: str, log: list[str], *, fail: str | None = None, sleep: float = 0
    ) -> None:
        self.name, self.log, self.fail, self.sleep = name, log, fail, sleep

    async def on_request(self, call: Call) -> None:
        self.log.append(f"{self.name}.request")
        if self.sleep:
            await asyncio.sleep(self.sleep)
        if self.fail == "crash":
            raise RuntimeError("boom")
        if self.fail == "refuse":
            raise BadRequest("refused by policy", code="refused_by_test")
        call.request["messages"][-1]["content"] += f" [{self.name}]"

    async def on_response(self, call: Call) -> None:
        self.log.append(f"{self.name}.response")
        call.response_headers[f"x-{self.name}"] = "seen"

    def wrap_stream(self, call: Call, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        async def gen() -> AsyncIterator[Chunk]:
            self.log.append(f"{self.name}.stream")
            async for chunk in chunks:
                yield chunk

        return gen()

    async def on_error(self, call: Call, error: Exception) -> None:
        self.log.append(f"{self.name}.error:{type(error).__name__}")


def plugin(name: str, log: list[str], version: str = "1.0", **kw: Any) -> types.SimpleNamespace:
    """A plugin object registering one Recorder stage."""

    class Impl:
        __version__ = version

        @hookimpl
        def veil_register_stages(self, register: Any, settings: Any) -> None:
            log.append(f"{name}.settings:{settings!r}")
            register(Recorder(name, log, **kw))

    return Impl()


def _chat(gw: Any, **kw: Any) -> Any:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as c:
        return c.chat.completions.with_raw_response.create(model="mock-model", messages=MSG, **kw)


def test_stages_run_in_policy_order_and_responses_in_reverse(
    policy_kit: PolicyKit, start_gateway
) -> None:  # noqa: ANN001
    log: list[str] = []
    plugins = {"alpha": plugin("alpha", log), "beta": plugin("beta", log)}
    gw = start_gateway(policy_kit.write(policy_toml(pipeline=["beta", "alpha"])), plugins)
    raw = _chat(gw)
    body = raw.parse()
    calls = [e for e in log if ".settings" not in e]
    assert calls == ["beta.request", "alpha.request", "alpha.response", "beta.response"]
    # the upstream saw both rewrites, in order
    assert body.choices[0].message.content.endswith("hello [beta] [alpha]")
    assert raw.headers["x-alpha"] == raw.headers["x-beta"] == "seen"
    log.clear()
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY) as c:
        list(c.chat.completions.create(model="mock-model", messages=MSG, stream=True))
    assert log == [
        "beta.request",
        "alpha.request",
        "beta.stream",
        "alpha.stream",
        "alpha.response",
        "beta.response",
    ]


def test_failing_stage_fails_closed_and_upstream_is_never_called(
    policy_kit: PolicyKit,
    start_gateway,
    mock_upstream,  # noqa: ANN001
) -> None:
    log: list[str] = []
    deployments = [
        {
            "name": "mock-model",
            "provider": "openai",
            "model": "m",
            "api_base": mock_upstream.url + "/v1",
        }
    ]
    path = policy_kit.write(
        policy_toml(pipeline=["first", "broken", "late"], deployments=deployments)
    )
    plugins = {
        "first": plugin("first", log),
        "broken": plugin("broken", log, fail="crash"),
        "late": plugin("late", log),
    }
    gw = start_gateway(path, plugins)
    with pytest.raises(openai.InternalServerError) as e:
        _chat(gw)
    assert e.value.status_code == 500 and e.value.code == "stage_failed"
    assert "broken" in e.value.message and "boom" not in e.value.message
    assert mock_upstream.app.settings.stats["requests"] == 0
    assert "late.request" not in log
    # on_error ran for every stage, in reverse order
    assert log[-3:] == [
        "late.error:StageFailed",
        "broken.error:StageFailed",
        "first.error:StageFailed",
    ]


def test_refusing_stage_gives_its_own_error(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    log: list[str] = []
    gw = start_gateway(
        policy_kit.write(policy_toml(pipeline=["guard"])),
        {"guard": plugin("guard", log, fail="refuse")},
    )
    with pytest.raises(openai.BadRequestError) as e:
        _chat(gw)
    assert e.value.code == "refused_by_test"
    assert log[-1] == "guard.error:BadRequest"


def test_fail_open_stage_is_skipped(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    log: list[str] = []
    path = policy_kit.write(policy_toml(pipeline=["sink"], plugins={"sink": {"fail": "open"}}))
    gw = start_gateway(path, {"sink": plugin("sink", log, fail="crash")})
    assert _chat(gw).parse().choices[0].message.content


def test_stage_timeout_fails_closed_with_503(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    log: list[str] = []
    path = policy_kit.write(policy_toml(pipeline=["slow"], plugins={"slow": {"timeout_ms": 50}}))
    gw = start_gateway(path, {"slow": plugin("slow", log, sleep=1)})
    with pytest.raises(openai.InternalServerError) as e:
        _chat(gw)
    assert e.value.status_code == 503 and e.value.code == "stage_timeout"


def test_stage_can_answer_a_call_itself(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    class Answer:
        name = "answer"

        async def on_request(self, call: Call) -> None:
            call.response = {
                "id": "chatcmpl-cached",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "logprobs": None,
                        "message": {
                            "role": "assistant",
                            "content": "from the stage",
                            "refusal": None,
                        },
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
            }

    class Impl:
        @hookimpl
        def veil_register_stages(self, register: Any) -> None:
            register(Answer())

    gw = start_gateway(policy_kit.write(policy_toml(pipeline=["answer"])), {"answer": Impl()})
    assert _chat(gw).parse().choices[0].message.content == "from the stage"
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY) as c:
        chunks = list(
            c.chat.completions.create(
                model="mock-model",
                messages=MSG,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        == "from the stage"
    )
    assert chunks[-1].usage.total_tokens == 4


class PlainHooks:
    """A stage whose hooks are plain functions: done at once (``None``), or
    returning the awaitable that finishes them (``wait`` seconds)."""

    name = "plain"

    def __init__(self, log: list[str], wait: float | None = None) -> None:
        self.log, self.wait = log, wait

    def _later(self, what: str) -> Any:
        if self.wait is None:
            self.log.append(what)
            return None

        async def finish() -> None:
            await asyncio.sleep(self.wait or 0)
            self.log.append(what + " after waiting")

        return finish()

    def on_request(self, call: Call) -> Any:
        return self._later("request")

    def on_response(self, call: Call) -> Any:
        call.response_headers["x-plain"] = "seen"
        return self._later("response")

    def on_error(self, call: Call, error: Exception) -> Any:
        return self._later(f"error:{type(error).__name__}")

    def on_finish(self, call: Call) -> Any:
        return self._later("finish")


def _plain_plugin(stage: Any) -> Any:
    class Impl:
        @hookimpl
        def veil_register_stages(self, register: Any) -> None:
            register(stage)

    return Impl()


@pytest.mark.parametrize("wait", [None, 0.0], ids=["done-at-once", "returns-awaitable"])
def test_stage_hooks_may_be_plain_functions(
    policy_kit: PolicyKit,
    start_gateway,  # noqa: ANN001
    wait: float | None,
) -> None:
    log: list[str] = []
    path = policy_kit.write(policy_toml(pipeline=["plain"]))
    gw = start_gateway(path, {"plain": _plain_plugin(PlainHooks(log, wait))})
    r = _chat(gw)
    assert r.headers["x-plain"] == "seen"
    suffix = "" if wait is None else " after waiting"
    assert log == [f"{h}{suffix}" for h in ("request", "response", "finish")]


def test_a_plain_hooks_awaitable_is_held_to_the_stage_timeout(
    policy_kit: PolicyKit,
    start_gateway,  # noqa: ANN001
) -> None:
    log: list[str] = []
    path = policy_kit.write(policy_toml(pipeline=["plain"], plugins={"plain": {"timeout_ms": 50}}))
    gw = start_gateway(path, {"plain": _plain_plugin(PlainHooks(log, wait=1))})
    with pytest.raises(openai.InternalServerError) as e:
        _chat(gw)
    assert e.value.status_code == 503 and e.value.code == "stage_timeout"


def test_generator_hooks_are_refused_at_registration() -> None:
    class Yields:
        name = "yields"

        def on_request(self, call: Call) -> Any:
            yield None

    registrar = StageRegistrar("yields", 1.0, False)
    with pytest.raises(PluginError, match="on_request must be `async def`, or a plain `def`"):
        registrar(Yields())


def test_settings_are_validated_by_the_plugin(policy_kit: PolicyKit) -> None:
    class Settings(BaseModel):
        words: list[str] = []

    class Impl:
        @hookimpl
        def veil_settings_model(self) -> type[BaseModel]:
            return Settings

        @hookimpl
        def veil_register_stages(self, register: Any, settings: Settings) -> None:
            assert isinstance(settings, Settings)

    good = parse_policy(policy_toml(pipeline=["w"], sections={"w": {"words": ["a"]}}).encode())
    Runtime.build(good, Metrics(), {"w": Impl()})
    bad = parse_policy(policy_toml(pipeline=["w"], sections={"w": {"words": 5}}).encode())
    with pytest.raises(PolicyError, match=r"section \[w\] is invalid"):
        Runtime.build(bad, Metrics(), {"w": Impl()})


def test_version_range_is_enforced(policy_kit: PolicyKit) -> None:
    log: list[str] = []
    p = parse_policy(policy_toml(pipeline=["v"], plugins={"v": {"version": ">=2,<3"}}).encode())
    with pytest.raises(PluginError, match=r"'v' version 1.0 is installed.*>=2,<3"):
        Runtime.build(p, Metrics(), {"v": plugin("v", log, version="1.0")})
    Runtime.build(p, Metrics(), {"v": plugin("v", log, version="2.5")})


def test_named_but_missing_plugin_stops_start_up(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    with pytest.raises(RuntimeError):
        start_gateway(policy_kit.write(policy_toml(pipeline=["no-such-plugin"])))
    p = parse_policy(policy_toml(pipeline=["no-such-plugin"]).encode())
    with pytest.raises(
        PluginError, match="'no-such-plugin' is named by the policy but not installed"
    ):
        Runtime.build(p, Metrics())


def test_async_implementation_of_a_sync_hook_is_refused() -> None:
    class Impl:
        @hookimpl
        async def veil_register_stages(self, register: Any) -> None:  # wrong: sync hook
            pass

    p = parse_policy(policy_toml(pipeline=["bad"]).encode())
    with pytest.raises(PluginError, match="'bad'.*veil_register_stages as `async def`"):
        Runtime.build(p, Metrics(), {"bad": Impl()})


def test_plugin_section_without_the_plugin_is_refused() -> None:
    with pytest.raises(PolicyError, match=r"section \[pii\] belongs to no plugin"):
        parse_policy(policy_toml(sections={"pii": {"entities": ["PERSON"]}}).encode())


def test_startup_and_shutdown_hooks_are_awaited(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    events: list[str] = []

    class Impl:
        @hookimpl
        async def veil_startup(self, runtime: Any) -> None:
            await asyncio.sleep(0)
            events.append(f"start:{runtime.policy.version}")

        @hookimpl
        def veil_shutdown(self) -> None:
            events.append("stop")

        @hookimpl
        def veil_register_routes(self, register: Any) -> None:
            async def hello(request: Any) -> Any:
                from starlette.responses import JSONResponse

                return JSONResponse({"who": request.state.principal.team})

            register("/hello", hello)

    gw = start_gateway(policy_kit.write(policy_toml(plugins={"life": {}})), {"life": Impl()})
    r = httpx.get(gw.url + "/hello", headers={"authorization": f"Bearer {TEST_KEY}"})
    assert r.json() == {"who": "test"}
    gw.stop()
    assert events == ["start:1", "stop"]


def test_plugin_providers_serve_deployments(policy_kit: PolicyKit, start_gateway) -> None:  # noqa: ANN001
    """A plugin registers a provider; a deployment names it. Its chat_stream
    may be a plain async generator."""
    from veil.mock import MockModel

    model = MockModel(created=1)

    class Shouting:
        async def chat(self, call: Call, deployment: Any, body: dict) -> dict:
            answer = model.chat(body)
            answer["choices"][0]["message"]["content"] = "LOUD"
            return answer

        async def chat_stream(
            self, call: Call, deployment: Any, body: dict
        ) -> AsyncIterator[Chunk]:
            for chunk in model.chat_chunks(body):
                yield chunk

        async def embeddings(self, call: Call, deployment: Any, body: dict) -> dict:
            return model.embeddings(body)

        async def aclose(self) -> None:
            pass

    class Impl:
        @hookimpl
        def veil_register_providers(self, register: Any) -> None:
            register("shouting", Shouting)

    deployments = [{"name": "loud", "provider": "shouting", "model": "loud-1"}]
    path = policy_kit.write(policy_toml(plugins={"shout": {}}, deployments=deployments))
    gw = start_gateway(path, {"shout": Impl()})
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as c:
        assert (
            c.chat.completions.create(model="loud", messages=MSG).choices[0].message.content
            == "LOUD"
        )
        chunks = list(c.chat.completions.create(model="loud", messages=MSG, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_unknown_provider_is_refused_at_load() -> None:
    deployments = [{"name": "x", "provider": "nowhere", "model": "x"}]
    p = parse_policy(policy_toml(deployments=deployments).encode())
    with pytest.raises(PolicyError, match="provider 'nowhere', which no loaded plugin provides"):
        Runtime.build(p, Metrics())


_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}
_SHAPES: dict[str, dict[str, Any]] = {
    "text": {},
    "two-choices": {"n": 2},
    "tool-call": {"tools": [_TOOL], "tool_choice": "required"},
}


@pytest.mark.parametrize("shape", list(_SHAPES))
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("kind", ["stream_text", "stream_chunks"])
def test_a_stage_can_ask_for_the_streamed_text_without_wrapping_the_stream(
    policy_kit: PolicyKit,
    start_gateway,  # noqa: ANN001
    kind: str,
    wrapped: bool,
    shape: str,
) -> None:
    seen: dict[str, Any] = {}

    class Counter:
        name = "counter"

        async def on_request(self, call: Call) -> None:
            setattr(call, kind, [])

        async def on_response(self, call: Call) -> None:
            seen["text"] = call.streamed_text()
            seen["kept"] = getattr(call, kind)

    class Watcher:  # another stage's wrapper: the core's other stream path
        name = "watcher"

        async def wrap_stream(self, call: Call, chunks: Any) -> Any:
            async for chunk in chunks:
                yield chunk

    class Impl:
        def __init__(self, stage: Any) -> None:
            self.stage = stage

        @hookimpl
        def veil_register_stages(self, register: Any, settings: Any) -> None:
            register(self.stage)

    pipeline = ["counter", "watcher"] if wrapped else ["counter"]
    path = policy_kit.write(policy_toml(pipeline=pipeline))
    plugins = {"counter": Impl(Counter()), "watcher": Impl(Watcher())}
    gw = start_gateway(path, {name: plugins[name] for name in pipeline})
    assert bool(gw.gateway.runtime.pipeline.stream) is wrapped
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as c:
        chunks = list(
            c.chat.completions.create(
                model="mock-model", messages=MSG, stream=True, **_SHAPES[shape]
            )
        )
    # every choice's text and tool-call arguments, in the order they came
    streamed = "".join(
        (choice.delta.content or "")
        + "".join(t.function.arguments or "" for t in choice.delta.tool_calls or () if t.function)
        for ch in chunks
        for choice in ch.choices
    )
    assert streamed and seen["text"] == streamed
    if shape == "tool-call":
        assert any(choice.delta.tool_calls for ch in chunks for choice in ch.choices)
    if shape == "two-choices":
        assert {choice.index for ch in chunks for choice in ch.choices} == {0, 1}
    if kind == "stream_chunks":  # the upstream's chunks, and the usage chunk the core asked for
        kept = seen["kept"]
        assert len(kept) == len(chunks) + 1 and kept[-1]["usage"]["completion_tokens"] > 0


class Finisher:
    """A stage that records when ``on_finish`` runs and what the call held then."""

    def __init__(self, name: str, log: list[str], *, refuse: bool = False) -> None:
        self.name, self.log, self.refuse = name, log, refuse

    async def on_response(self, call: Call) -> None:
        self.log.append(f"{self.name}.response")

    async def on_error(self, call: Call, error: Exception) -> None:
        self.log.append(f"{self.name}.error:{type(error).__name__}")

    async def on_finish(self, call: Call) -> None:
        status = "ok" if call.error is None else call.error.code
        self.log.append(f"{self.name}.finish:{status}")
        if self.refuse and call.error is None:
            raise BadRequest("the sink refused", code="sink_refused")


def finisher(name: str, log: list[str], **kw: Any) -> Any:
    class Impl:
        @hookimpl
        def veil_register_stages(self, register: Any) -> None:
            register(Finisher(name, log, **kw))

    return Impl()


def test_on_finish_runs_once_after_every_response_stage_and_on_failures(
    policy_kit: PolicyKit,
    start_gateway,  # noqa: ANN001
) -> None:
    log: list[str] = []
    plugins = {"early": finisher("early", log), "late": finisher("late", log)}
    gw = start_gateway(policy_kit.write(policy_toml(pipeline=["early", "late"])), plugins)
    _chat(gw)
    assert log == ["late.response", "early.response", "late.finish:ok", "early.finish:ok"]
    log.clear()
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY) as c:
        list(c.chat.completions.create(model="mock-model", messages=MSG, stream=True))
    assert log == ["late.response", "early.response", "late.finish:ok", "early.finish:ok"]
    log.clear()
    with (
        openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY, max_retries=0) as c,
        pytest.raises(openai.NotFoundError),
    ):
        c.chat.completions.create(model="no-such-model", messages=MSG)
    assert log == [
        "late.error:NotFound",
        "early.error:NotFound",
        "late.finish:model_not_found",
        "early.finish:model_not_found",
    ]


def test_on_finish_can_refuse_a_call_that_succeeded(
    policy_kit: PolicyKit,
    start_gateway,  # noqa: ANN001
) -> None:
    log: list[str] = []
    gw = start_gateway(
        policy_kit.write(policy_toml(pipeline=["sink"])),
        {"sink": finisher("sink", log, refuse=True)},
    )
    with pytest.raises(openai.BadRequestError) as e:
        _chat(gw)
    assert e.value.code == "sink_refused"
    assert log == [
        "sink.response",
        "sink.finish:ok",
        "sink.error:BadRequest",
        "sink.finish:sink_refused",
    ]
