"""Durability and failure modes, on ``veil serve`` processes: a SIGKILL under
load loses no record of an answered call; a sink that cannot write refuses
calls (``fail = "closed"``) or serves them and counts the dropped records
(``fail = "open"``). The sink failure is real: the gateway process gets a
file-size limit (``RLIMIT_FSIZE``) its audit file is already at, so the
kernel refuses to grow it (EFBIG) once the room allocated ahead is used."""

from __future__ import annotations

import asyncio
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from audittest import KEY, by_request, calls, section, upstream
from veil_audit.chain import load_key
from veil_audit.verify import verify

from veil.testing import ADMIN_KEY, TEST_KEY, GatewayProcess, PolicyKit, ServerThread, policy_toml

BODY = {"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}


def audit_policy(kit: PolicyKit, mock: ServerThread, directory: Path, **audit: Any) -> Path:
    """A signed policy with the audit stage alone, writing to ``directory``."""
    entry = {"fail": audit.pop("fail", "closed")}
    text = policy_toml(
        pipeline=["audit"], plugins={"audit": entry}, deployments=[upstream(mock.url)]
    )
    text += section("audit", {"path": str(directory), **audit})
    return kit.write(text, f"gw-{time.monotonic_ns()}.toml")


def serve(kit: PolicyKit, mock: ServerThread, directory: Path, **audit: Any) -> GatewayProcess:
    return GatewayProcess(
        audit_policy(kit, mock, directory, **audit),
        kit.public_key_path,
        state_dir=kit.state_dir,
        env={"VEIL_AUDIT_HMAC_KEY": KEY},
    )


def post(url: str, rid: str, client: httpx.Client | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {TEST_KEY}", "x-request-id": rid}
    c = client or httpx
    return c.post(url + "/v1/chat/completions", json=BODY, headers=headers, timeout=10)


def test_kill_9_under_load_loses_no_record_of_an_answered_call(
    policy_kit: PolicyKit, mock_upstream: ServerThread, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    gw = serve(policy_kit, mock_upstream, directory).wait_ready()
    answered: list[str] = []
    stop = threading.Event()

    async def load() -> None:
        async with httpx.AsyncClient(timeout=10) as client:

            async def worker(w: int) -> None:
                n = 0
                while not stop.is_set():
                    rid = f"load-{w}-{n}"
                    n += 1
                    try:
                        r = await client.post(
                            gw.url + "/v1/chat/completions",
                            json=BODY,
                            headers={"authorization": f"Bearer {TEST_KEY}", "x-request-id": rid},
                        )
                    except httpx.HTTPError:
                        return  # the gateway is gone
                    if r.status_code == 200:
                        answered.append(rid)

            await asyncio.gather(*(worker(w) for w in range(16)))

    thread = threading.Thread(target=lambda: asyncio.run(load()))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while len(answered) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(10)
    finally:
        stop.set()
        thread.join(20)
        gw.stop()
    assert len(answered) >= 300
    recorded = by_request(directory)
    missing = [rid for rid in answered if rid not in recorded]
    assert not missing, f"{len(missing)} answered calls have no record, e.g. {missing[:3]}"
    verdict = verify(sorted(directory.glob("audit*.jsonl")), load_key("VEIL_AUDIT_HMAC_KEY"))
    assert verdict.ok, verdict.problem
    assert not verdict.closed  # killed: no closing record
    # a restart continues the same chain
    with serve(policy_kit, mock_upstream, directory) as again:
        assert post(again.url, "after-restart").status_code == 200
    verdict = verify(sorted(directory.glob("audit*.jsonl")), KEY.encode())
    assert verdict.ok and verdict.closed, verdict.problem
    assert "after-restart" in by_request(directory)


def _limit_file_size(pid: int, size: int) -> None:
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("fail", ["closed", "open"])
def test_a_sink_that_cannot_write_refuses_or_counts_as_the_policy_says(
    policy_kit: PolicyKit, mock_upstream: ServerThread, tmp_path: Path, fail: str
) -> None:
    directory = tmp_path / "audit"
    # 64 KiB at a time: the room allocated ahead runs out after a few dozen records
    with (
        serve(policy_kit, mock_upstream, directory, fail=fail, preallocate_mb=0.065536) as gw,
        httpx.Client() as c,
    ):
        for i in range(20):
            assert post(gw.url, f"before-{i}", c).status_code == 200
        # the file (records and the room ahead of them) cannot grow any more
        _limit_file_size(gw.proc.pid, (directory / "audit.jsonl").stat().st_size)
        served = 0
        for i in range(400):  # until the room is used up
            r = post(gw.url, f"while-broken-{i}", c)
            if _metric(gw.url, 'veil_audit_records_total{result="dropped"}'):
                break
            assert r.status_code == 200
            served += 1
        else:
            pytest.fail("the audit file never ran out of room")
        if fail == "closed":
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "audit_unavailable"
        else:
            assert r.status_code == 200
        dropped = _metric(gw.url, 'veil_audit_records_total{result="dropped"}')
        assert dropped == (2.0 if fail == "closed" else 1.0)  # closed: the 503's record too
        _limit_file_size(gw.proc.pid, resource.RLIM_INFINITY)
        assert post(gw.url, "recovered", c).status_code == 200
    records = by_request(directory)
    assert f"while-broken-{served}" not in records and "recovered" in records
    assert served > 0  # the room allocated ahead served calls past the limit
    assert len(calls(directory)) == 20 + served + 1
    # nothing half-written stayed behind: the chain is whole
    verdict = verify(sorted(directory.glob("audit*.jsonl")), KEY.encode())
    assert verdict.ok and verdict.closed, verdict.problem


def test_a_gateway_without_its_key_does_not_start_and_says_what_to_set(
    policy_kit: PolicyKit, mock_upstream: ServerThread, tmp_path: Path
) -> None:
    unkeyed = GatewayProcess(
        audit_policy(policy_kit, mock_upstream, tmp_path / "audit"),
        policy_kit.public_key_path,
        state_dir=policy_kit.state_dir,
        env={"VEIL_AUDIT_HMAC_KEY": ""},
    )
    try:
        assert unkeyed.wait(60) == 5  # `veil serve`: a plugin could not start
        out = unkeyed.output()
    finally:
        unkeyed.stop()
    assert "veil cannot start: plugin 'audit' $VEIL_AUDIT_HMAC_KEY is not set" in out
    assert "openssl rand -hex 32" in out  # how to fix it
    assert "Traceback" not in out
