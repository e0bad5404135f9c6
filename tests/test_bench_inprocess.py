"""bench.serve_inprocess: the serve path's CPU per call, in-process, both kinds of call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import serve_inprocess

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_measures_the_core_against_a_stage(stream: bool) -> None:
    # in a process of its own: the tool configures logging for the whole process
    argv = ["--stage", "cache", "--calls", "32", "--rounds", "1", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.serve_inprocess", *argv, *(["--stream"] if stream else [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["stream"] is stream
    assert set(doc["gateways"]) == {"core", "cache"}
    for gateway in doc["gateways"].values():
        assert gateway["cpu_us_per_call"] > 0


def test_the_stub_streams_the_mocks_chunks_usage_last() -> None:
    frames = serve_inprocess._stream_frames()
    # the mock's stream for the bench body: a role chunk, text chunks, the usage chunk
    assert len(frames) > 3
    assert b'"usage":{' in frames[-1]
