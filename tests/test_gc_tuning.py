"""The serving process's garbage-collector tuning (veil.gc_tuning), run in a
child process: the collector's settings are process-wide, and the tests'
own gateways keep the interpreter's defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from veil.testing import PolicyKit, policy_toml

# Starts a Gateway with tune_gc on, reloads it, and reports what the collector saw.
CHILD = r"""
import asyncio, gc, json, sys, weakref
from pathlib import Path
from veil.gateway import Gateway, GatewayConfig

policy, key, second = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

async def main():
    default = gc.get_threshold()
    gateway = Gateway(GatewayConfig(policy, [key], "test", watch_interval=0, tune_gc=True))
    await gateway.start()
    out = {"default": default, "threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}
    old = weakref.ref(gateway.runtime)
    gateway.runtime.leak = [gateway.runtime]  # a cycle: only the collector frees it
    policy.write_bytes(second.read_bytes())
    policy.with_name(policy.name + ".sig").write_bytes(
        second.with_name(second.name + ".sig").read_bytes()
    )
    out["reloaded"] = await gateway.reload()
    for _ in range(100):
        if not gateway._retiring:
            break
        await asyncio.sleep(0.01)
    out["old_freed"] = old() is None
    out["frozen_after"] = gc.get_freeze_count()
    await gateway.stop()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_serving_settings_and_a_retired_runtime_is_collected(
    policy_kit: PolicyKit, tmp_path: Path
) -> None:
    path = policy_kit.write(policy_toml(version=1), "serve.toml")
    second = policy_kit.write(policy_toml(version=2), "next.toml")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(policy_kit.public_key_path), str(second)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["default"][0] == 700
    assert out["threshold"][0] == 20_000
    assert out["frozen"] > 10_000  # the start-up heap is out of the collector's walks
    assert out["reloaded"] is True
    # the retired runtime was frozen with the rest, yet its cycle is collected
    assert out["old_freed"] is True
    assert out["frozen_after"] > 10_000


def test_the_environment_turns_it_off_in_the_usual_words() -> None:
    from veil.gateway import GatewayConfig

    base = {"VEIL_POLICY": "p.toml", "VEIL_TRUSTED_KEYS": "k.pub", "VEIL_AUDIENCE": "a"}
    assert GatewayConfig.from_env(base).tune_gc is True  # a serving process tunes
    for off in ("0", "false", "No", " off "):
        assert GatewayConfig.from_env({**base, "VEIL_GC_TUNING": off}).tune_gc is False
    assert GatewayConfig.from_env({**base, "VEIL_GC_TUNING": "1"}).tune_gc is True
