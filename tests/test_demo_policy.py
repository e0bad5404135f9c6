"""The demo policy that ``make run`` serves: signed with a throwaway key
(as ``make run`` signs it with a local one), it starts ``veil serve`` with
every plugin it names, and the official SDK gets answers through them,
plain and streamed, with each plugin's mark on the call."""

from __future__ import annotations

import secrets
from pathlib import Path

import openai
import pytest

from veil.testing import GatewayProcess, PolicyKit

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "policies" / "demo.toml"
DEMO_KEY = "sk-veil-demo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[GatewayProcess, Path, str]:
    kit = PolicyKit(tmp_path_factory.mktemp("demo"))
    policy = kit.write(DEMO.read_bytes(), "demo.toml")
    hmac_key = secrets.token_hex(32)
    gw = GatewayProcess(
        policy,
        kit.public_key_path,
        audience="demo",
        state_dir=kit.state_dir,
        env={"VEIL_AUDIT_HMAC_KEY": hmac_key},
    ).wait_ready(timeout=120)
    yield gw, kit.state_dir, hmac_key
    gw.stop()


def test_the_demo_policy_serves_through_every_plugin_it_names(
    demo: tuple[GatewayProcess, Path, str], request: pytest.FixtureRequest
) -> None:
    gw, state_dir, hmac_key = demo
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=DEMO_KEY, max_retries=0)
    request.addfinalizer(client.close)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Write to jane.doe@example.com about the demo."}],
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers["x-veil-pii"]  # pii redacted the address before it left
    assert int(raw.headers["x-ratelimit-remaining-requests"]) >= 0  # budget metered it
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    with pytest.raises(openai.BadRequestError) as refused:  # cards never leave
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "My card is 4111 1111 1111 1111."}],
        )
    assert refused.value.code == "pii_blocked"
    routed = client.chat.completions.with_raw_response.create(  # routing: a keyword rule
        model="fast", messages=[{"role": "user", "content": "Where is my invoice?"}]
    )
    assert routed.headers["x-veil-route"] and routed.parse().model == "mock-large"
    question = {"model": "gpt-4o-mini", "temperature": 0}
    ask = [{"role": "user", "content": "What does veil do?"}]
    first = client.chat.completions.with_raw_response.create(messages=ask, **question)
    again = client.chat.completions.with_raw_response.create(messages=ask, **question)
    assert (first.headers["x-veil-cache"], again.headers["x-veil-cache"]) == ("miss", "hit")
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content

    from veil_audit.files import chain_files
    from veil_audit.verify import verify

    files = chain_files(state_dir / "audit")
    verdict = verify(files, hmac_key.encode())
    assert verdict.ok, verdict.problem
    assert verdict.records >= 7  # audit_opened and a record for each of the six calls
