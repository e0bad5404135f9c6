"""Checking audit files: is every record authentic, and is the chain whole?

:func:`verify` reads the given files (in chain order: by the seq of their
first record), authenticates every record with the key, and follows the
chain. It reports the **first** problem, naming the file, the line and the
record (seq and request id), as one of:

- ``edited``: a record's bytes changed (its MAC does not match), or a line
  is not a sealed record at all;
- ``truncated``: a file ends in the middle of a record;
- ``deleted``: records are missing (a gap in the sequence: removed lines, a
  file cut short at a record boundary, or a missing file);
- ``inserted``: a record that does not belong there (a copy of another
  record, or one from another chain);
- ``reordered``: records are out of order (a later record comes first).

A chain that does not start at its first record (seq 0) is reported as
``deleted`` unless ``partial=True`` (older files archived elsewhere).
Whether the last file ends with a closing record (``audit_closed``, written
at a clean shutdown) is reported as ``closed``: a file without one is being
written, or its gateway crashed, or its end was cut at a record boundary,
which no chain can tell apart without a copy kept elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .chain import Mac, Unsealed, key_id, open_line
from .files import read_records_bytes

__all__ = ["Problem", "Verdict", "verify"]


@dataclass(frozen=True)
class Problem:
    """The first thing wrong with the chain."""

    kind: str
    file: str
    line: int
    seq: int | None
    request_id: str | None
    message: str


@dataclass
class Verdict:
    """What :func:`verify` found."""

    files: list[str]
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    closed: bool = False
    key_ids: list[str] = field(default_factory=list)
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


@dataclass(frozen=True, slots=True)
class _Entry:
    file: str
    line: int
    seq: int | None
    prev: str | None
    mac: str | None
    request_id: str | None
    event: str | None
    damage: str | None  # "edited" or "truncated" when the line cannot be trusted


def _read(path: Path, mac: Mac) -> list[_Entry]:
    data = read_records_bytes(path)
    lines = data.split(b"\n")
    partial_tail = lines[-1] != b""
    if not partial_tail:
        lines.pop()
    out = []
    for n, line in enumerate(lines, 1):
        last_partial = partial_tail and n == len(lines)
        try:
            opened = open_line(line, mac)
        except Unsealed:
            out.append(
                _Entry(str(path), n, None, None, None, None, None,
                       "truncated" if last_partial else "edited")
            )  # fmt: skip
            continue
        rid = opened.record.get("request_id")
        event = opened.record.get("event")
        damage = None if opened.authentic else ("truncated" if last_partial else "edited")
        out.append(
            _Entry(
                str(path), n, opened.seq, opened.prev, opened.mac,
                rid if isinstance(rid, str) else None,
                event if isinstance(event, str) else None, damage,
            )
        )  # fmt: skip
    return out


def _name(e: _Entry) -> str:
    who = f"record seq {e.seq}" if e.seq is not None else "a record"
    rid = f" (request {e.request_id})" if e.request_id else ""
    return f"{who}{rid} at {e.file}:{e.line}"


def verify(paths: Iterable[Path], key: bytes, *, partial: bool = False) -> Verdict:
    """Check the chain formed by ``paths`` under ``key``.

    :raises OSError: a file cannot be read.
    """
    mac = Mac(key)
    per_file = [(p, _read(p, mac)) for p in paths]
    per_file.sort(key=lambda pe: min((e.seq for e in pe[1] if e.seq is not None), default=-1))
    entries = [e for _, pe in per_file for e in pe]
    verdict = Verdict(files=[str(p) for p, _ in per_file], records=len(entries))
    verdict.key_ids = [key_id(key)]

    def fail(kind: str, e: _Entry, message: str) -> Verdict:
        verdict.problem = Problem(kind, e.file, e.line, e.seq, e.request_id, message)
        return verdict

    for e in entries:
        if e.damage == "truncated":
            return fail("truncated", e, f"{e.file} ends in the middle of a record (line {e.line})")
        if e.damage == "edited":
            if e.seq is None:
                return fail("edited", e, f"line {e.line} of {e.file} is not a sealed record")
            return fail(
                "edited", e,
                f"{_name(e)} was changed after it was written: its MAC does not match "
                "(or the key is not the one that wrote it)",
            )  # fmt: skip
    seen: dict[int, _Entry] = {}
    expected: int | None = None
    prev: _Entry | None = None
    remaining = {e.seq for e in entries}
    for i, e in enumerate(entries):
        assert e.seq is not None
        if expected is None:
            expected = e.seq
            verdict.first_seq = e.seq
            if e.seq != 0 and not partial:
                return fail(
                    "deleted", e,
                    f"the chain starts at {_name(e)}: records 0 to {e.seq - 1} are missing "
                    "(pass every file, or --partial if older files are archived elsewhere)",
                )  # fmt: skip
        if e.seq != expected:
            if e.seq < expected:
                first = seen.get(e.seq)
                if first is not None and first.mac == e.mac:
                    return fail(
                        "inserted", e, f"{_name(e)} is a copy of the record at line {first.line}"
                    )
                return fail("reordered", e, f"{_name(e)} comes after record seq {expected - 1}")
            later = {x.seq for x in entries[i + 1 :]}
            if expected in later:
                return fail(
                    "reordered", e,
                    f"{_name(e)} comes before record seq {expected}, which is further on",
                )  # fmt: skip
            where = f"after {_name(prev)}" if prev is not None else "at the start"
            missing = f"seq {expected}" + (f" to {e.seq - 1}" if e.seq - 1 > expected else "")
            return fail("deleted", e, f"records {missing} are missing, {where}")
        if prev is not None and e.prev != prev.mac:
            return fail(
                "inserted", e,
                f"{_name(e)} does not follow {_name(prev)} (its prev link differs): it was "
                "put there from another chain",
            )  # fmt: skip
        seen[e.seq] = e
        expected = e.seq + 1
        prev = e
    del remaining
    if prev is not None:
        verdict.last_seq = prev.seq
        verdict.closed = prev.event == "audit_closed"
    return verdict
