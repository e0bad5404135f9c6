"""bench.serve_inprocess: the serve path's CPU per call, in-process, both kinds of call."""

from __future__ import annotations

import json

import pytest

from bench import serve_inprocess


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_measures_the_core_against_a_stage(
    stream: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--stage", "cache", "--calls", "32", "--rounds", "1", "--json"]
    assert serve_inprocess.main(argv + (["--stream"] if stream else [])) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["stream"] is stream
    assert set(doc["gateways"]) == {"core", "cache"}
    for gateway in doc["gateways"].values():
        assert gateway["cpu_us_per_call"] > 0


def test_the_stub_streams_the_mocks_chunks_usage_last() -> None:
    frames = serve_inprocess._stream_frames()
    # the mock's stream for the bench body: a role chunk, text chunks, the usage chunk
    assert len(frames) > 3
    assert b'"usage":{' in frames[-1]
