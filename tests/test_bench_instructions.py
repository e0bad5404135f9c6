"""bench.instructions: instructions per request counted by callgrind."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from bench import instructions


def test_the_total_is_the_dumps_last_totals_line_not_its_summary(tmp_path: Path) -> None:
    dump = tmp_path / "core.1.1"
    dump.write_text("# callgrind format\nevents: Ir\nsummary: 0\n\nfn=(1) f\n0 5\n\ntotals: 1234\n")
    assert instructions.read_total(dump) == 1234
    partial = tmp_path / "core.1.2"
    partial.write_text("# callgrind format\nevents: Ir\nsummary: 0\nfn=(1) f\n")
    with pytest.raises(ValueError, match="no totals"):
        instructions.read_total(partial)


def test_bodies_are_made_unique_where_the_load_generator_would() -> None:
    unique = list(itertools.islice(instructions.bodies(b'{"m": "[__BENCH_SEQ__] hi"}'), 3))
    assert unique == [b'{"m": "[i-0] hi"}', b'{"m": "[i-1] hi"}', b'{"m": "[i-2] hi"}']
    same = list(itertools.islice(instructions.bodies(b'{"m": "hi"}'), 2))
    assert same == [b'{"m": "hi"}', b'{"m": "hi"}']


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert instructions.main(["budget", "--requests", "0"]) == instructions.EXIT_USAGE
    assert "--requests must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        instructions.main(["nonsense"])
    assert exc.value.code == 2


def test_without_valgrind_it_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert instructions.main(["audit"]) == instructions.EXIT_NO_VALGRIND
    assert "apt-get install valgrind" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
    reason="valgrind is not installed (apt-get install valgrind)",
)
def test_counts_core_and_the_audit_stage(capsys: pytest.CaptureFixture[str]) -> None:
    code = instructions.main(["audit", "--requests", "5", "--warmup", "2", "--json"])
    assert code == instructions.EXIT_OK, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    gateways = doc["gateways"]
    assert set(gateways) == {"core", "audit"}
    core, audit = gateways["core"], gateways["audit"]
    # a served chat call runs hundreds of thousands of instructions in user space
    assert core["instructions_per_request"] > 100_000
    assert core["ratio"] == 1.0 and core["added"] == 0
    # the audit stage writes a record per call: more work than the core alone
    assert audit["added"] > 0 and audit["ratio"] > 1.0
