"""Tamper evidence: ``veil audit verify`` finds an edited, deleted, inserted
or reordered record, or a truncated file, across rotated files, and names it.

The files are written by the real writer (the same code the gateway runs),
with rotation after a few records, then damaged the way an intruder would."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from audittest import KEY
from click.testing import CliRunner
from veil_audit.chain import Chain, Mac
from veil_audit.cli import audit
from veil_audit.files import chain_files
from veil_audit.settings import AuditSettings
from veil_audit.writer import Writer


def write_chain(directory: Path, count: int = 30, rotate_bytes: int = 2500) -> list[Path]:
    """``count`` call records through a real writer, rotating every ~2.5 KB."""
    settings = AuditSettings(path=str(directory), rotate_mb=rotate_bytes / 1_000_000, max_batch=2)
    writer = Writer(settings, KEY.encode(), directory=directory)
    writer.start()
    for i in range(count):
        writer.submit({"event": "call", "request_id": f"req-{i}", "status": 200, "n": i}, None)
    writer.stop()
    files = chain_files(directory)
    return files


def run_verify(*args: Any) -> tuple[int, str]:
    result = CliRunner().invoke(
        audit, ["verify", *map(str, args)], env={"VEIL_AUDIT_HMAC_KEY": KEY}
    )
    return result.exit_code, result.output


def verdict(directory: Path) -> dict[str, Any]:
    code, out = run_verify(directory, "--json")
    data = json.loads(out)
    assert code == (0 if data["ok"] else 1)
    return data


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def record_line(files: list[Path], request_id: str) -> tuple[Path, int]:
    for path in files:
        for n, line in enumerate(lines_of(path)):
            if f'"request_id":"{request_id}"'.encode() in line:
                return path, n
    raise AssertionError(request_id)


def test_mac_matches_the_standard_library() -> None:
    for key in (b"k" * 16, b"x" * 64, b"y" * 100):
        for message in (b"", b"abc", b"z" * 1000):
            assert Mac(key).hex(message) == hmac.new(key, message, hashlib.sha256).hexdigest()


def test_an_untouched_chain_verifies_across_rotated_files(tmp_path: Path) -> None:
    files = write_chain(tmp_path)
    assert len(files) >= 3, "rotated files"
    data = verdict(tmp_path)
    assert data["ok"] and data["closed"] and data["first_seq"] == 0
    assert data["records"] == data["last_seq"] + 1 >= 30 + 2
    code, out = run_verify(*files)
    assert code == 0 and out.startswith("OK:") and "clean shutdown" in out


def test_veil_has_the_audit_commands() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "veil", "audit", "verify", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "edited, deleted, inserted or reordered" in out


def test_the_chain_continues_across_restarts(tmp_path: Path) -> None:
    write_chain(tmp_path, 10)
    write_chain(tmp_path, 10)
    assert verdict(tmp_path)["ok"]


def test_a_flipped_byte_is_found_and_named(tmp_path: Path) -> None:
    files = write_chain(tmp_path)
    path, n = record_line(files, "req-17")
    lines = lines_of(path)
    lines[n] = lines[n].replace(b'"status":200', b'"status":201')
    path.write_bytes(b"".join(lines))
    data = verdict(tmp_path)
    assert data["problem"]["kind"] == "edited"
    assert data["problem"]["request_id"] == "req-17"
    assert data["problem"]["file"] == str(path) and data["problem"]["line"] == n + 1


def test_a_damaged_line_is_found(tmp_path: Path) -> None:
    files = write_chain(tmp_path)
    path, n = record_line(files, "req-5")
    data = bytearray(path.read_bytes())
    start = sum(len(x) for x in lines_of(path)[:n])
    data[start + 3] ^= 0x20  # inside the JSON syntax
    path.write_bytes(bytes(data))
    problem = verdict(tmp_path)["problem"]
    assert problem["kind"] == "edited" and problem["line"] == n + 1


def test_a_deleted_record_is_found_and_named(tmp_path: Path) -> None:
    files = write_chain(tmp_path)
    path, n = record_line(files, "req-12")
    lines = lines_of(path)
    seq = orjson.loads(lines[n])["seq"]
    del lines[n]
    path.write_bytes(b"".join(lines))
    code, out = run_verify(tmp_path)
    assert code == 1 and "TAMPERED (deleted)" in out and f"seq {seq} are missing" in out


def test_swapped_records_are_found_as_reordered(tmp_path: Path) -> None:
    files = write_chain(tmp_path)
    path, n = record_line(files, "req-20")
    lines = lines_of(path)
    assert n + 1 < len(lines)
    lines[n], lines[n + 1] = lines[n + 1], lines[n]
    path.write_bytes(b"".join(lines))
    problem = verdict(tmp_path)["problem"]
    assert problem["kind"] == "reordered" and problem["line"] == n + 1


def test_an_inserted_copy_is_found(tmp_path: Path) -> None:
    files = write_chain(tmp_path)
    path, n = record_line(files, "req-3")
    lines = lines_of(path)
    lines.insert(n + 2, lines[n])
    path.write_bytes(b"".join(lines))
    problem = verdict(tmp_path)["problem"]
    assert problem["kind"] == "inserted" and problem["request_id"] == "req-3"


def test_a_forged_record_is_found(tmp_path: Path) -> None:
    files = write_chain(tmp_path)
    path, n = record_line(files, "req-8")
    lines = lines_of(path)
    original = orjson.loads(lines[n])
    forger = Chain(b"not-the-gateway-key!", original["seq"], original["prev"])
    lines[n] = forger.seal(orjson.dumps({"event": "call", "request_id": "req-8", "status": 200}))
    path.write_bytes(b"".join(lines))
    assert verdict(tmp_path)["problem"]["kind"] == "edited"


def test_a_file_cut_mid_record_is_found_as_truncated(tmp_path: Path) -> None:
    files = write_chain(tmp_path)
    path = files[1]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    problem = verdict(tmp_path)["problem"]
    assert problem["kind"] == "truncated" and problem["file"] == str(path)


def test_a_file_cut_at_a_record_boundary_is_found(tmp_path: Path) -> None:
    files = write_chain(tmp_path)
    path = files[0]
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[:-2]))
    problem = verdict(tmp_path)["problem"]
    assert problem["kind"] == "deleted" and problem["file"] == str(files[1])


def test_a_missing_rotated_file_is_found(tmp_path: Path) -> None:
    files = write_chain(tmp_path)
    files[1].unlink()
    assert verdict(tmp_path)["problem"]["kind"] == "deleted"
    files[0].unlink()
    assert verdict(tmp_path)["problem"]["kind"] == "deleted"  # the chain's start is gone
    code, _ = run_verify(tmp_path, "--partial")
    assert code == 0


def test_verify_needs_the_key_and_says_how_to_set_it(tmp_path: Path) -> None:
    write_chain(tmp_path, 10)
    result = CliRunner().invoke(audit, ["verify", str(tmp_path)], env={"VEIL_AUDIT_HMAC_KEY": None})
    assert result.exit_code == 4 and "VEIL_AUDIT_HMAC_KEY" in result.output
    wrong = CliRunner().invoke(
        audit, ["verify", str(tmp_path)], env={"VEIL_AUDIT_HMAC_KEY": "x" * 32}
    )
    assert wrong.exit_code == 1 and "the key is not the one" in wrong.output


def test_a_partial_record_left_by_a_crash_is_kept_and_reported(tmp_path: Path) -> None:
    write_chain(tmp_path, 5, rotate_bytes=10_000_000)
    active = tmp_path / "audit.jsonl"
    active.write_bytes(active.read_bytes() + b'{"seq":7,"prev":"ab')  # a torn write
    write_chain(tmp_path, 5, rotate_bytes=2000)  # the next start moves it aside
    problem = verdict(tmp_path)["problem"]
    assert problem["kind"] == "truncated"


@pytest.mark.parametrize("settings", [{"sinks": ["file", "file"]}, {"rotate_mb": -1}])
def test_invalid_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AuditSettings(**settings)
