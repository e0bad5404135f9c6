"""The memory-mapped active file: records copied in on the event loop, room
allocated ahead and grown, rotation, and what a crash leaves (records, then
unwritten NUL space) picked up again by the next start and by ``verify``."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from audittest import KEY
from veil_audit.files import ACTIVE, ActiveFile, chain_files, read_records_bytes
from veil_audit.settings import AuditSettings
from veil_audit.verify import verify
from veil_audit.writer import Writer

PAGE = 4096


def writer(directory: Path, **settings: float) -> Writer:
    return Writer(
        AuditSettings(path=str(directory), preallocate_mb=PAGE / 1e6, **settings),
        KEY.encode(),
        directory=directory,
    )


def append(w: Writer, count: int, start: int = 0) -> None:
    async def run() -> None:
        for i in range(start, start + count):
            record = {"event": "call", "request_id": f"req-{i}", "status": 200, "pad": "x" * 200}
            assert w.append(record)
            if i % 10 == 0:
                await settled(w)

    asyncio.run(run())


async def settled(w: Writer) -> None:
    """Let the writer thread finish the upkeep the appends asked for (grow,
    rotate, fault in), as a gateway's idle moments do: on a loaded machine
    the thread may otherwise not run before every record is in."""
    deadline = time.monotonic() + 10
    await asyncio.sleep(0)
    while w._maintaining and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


def request_ids(directory: Path) -> list[str]:
    import orjson

    out = []
    for path in chain_files(directory):
        for line in read_records_bytes(path).splitlines():
            record = orjson.loads(line)
            if record["event"] == "call":
                out.append(record["request_id"])
    return out


def test_direct_appends_grow_the_file_and_rotate_and_the_chain_verifies(tmp_path: Path) -> None:
    w = writer(tmp_path, rotate_mb=0.02)
    assert w.direct
    w.start()
    append(w, 300)
    w.stop()
    files = chain_files(tmp_path)
    assert len(files) >= 3, "rotated by size"
    for path in files:  # cut back to their records: no unwritten space left
        data = path.read_bytes()
        assert data.endswith(b"}\n") and b"\0" not in data
    verdict = verify(files, KEY.encode())
    assert verdict.ok and verdict.closed, verdict.problem
    assert request_ids(tmp_path) == [f"req-{i}" for i in range(300)]


def test_the_room_ahead_is_allocated_before_the_records_need_it(tmp_path: Path) -> None:
    w = writer(tmp_path)
    w.start()
    try:
        file = w.file
        assert file is not None
        size = (tmp_path / ACTIVE).stat().st_size
        assert size == file.capacity and size % PAGE == 0 and file.room() > 0
        append(w, 50)  # ~13 KB: more than three chunks
        assert file.capacity > size
        deadline = time.monotonic() + 10  # the thread faults the room in, ahead of the records
        while file.populated < file.capacity and time.monotonic() < deadline:
            time.sleep(0.01)
        assert file.populated == file.capacity
    finally:
        w.stop()


def crashed_copy(src: Path, dst: Path, tail: bytes = b"") -> Path:
    """The directory as a SIGKILL would leave it: the active file's records,
    then (optionally) a torn record, then unwritten NUL space."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("audit.lock"))
    active = dst / ACTIVE
    data = active.read_bytes()
    records = data.rstrip(b"\0")
    assert len(records) < len(data), "a running writer's file ends in unwritten space"
    active.write_bytes(records + tail + b"\0" * (len(data) - len(records) - len(tail)))
    return dst


def test_a_crash_leaves_unwritten_space_that_verify_and_the_next_start_handle(
    tmp_path: Path,
) -> None:
    live = tmp_path / "live"
    w = writer(live)
    w.start()
    try:
        append(w, 20)
        crashed = crashed_copy(live, tmp_path / "crashed")
    finally:
        w.stop()
    verdict = verify(chain_files(crashed), KEY.encode())
    assert verdict.ok and not verdict.closed, verdict.problem
    assert verdict.records == 21  # audit_opened and 20 calls
    again = writer(crashed)
    again.start()
    append(again, 5, start=20)
    again.stop()
    verdict = verify(chain_files(crashed), KEY.encode())
    assert verdict.ok and verdict.closed, verdict.problem
    assert request_ids(crashed) == [f"req-{i}" for i in range(25)]


def test_a_record_torn_by_a_crash_is_kept_aside_and_reported(tmp_path: Path) -> None:
    live = tmp_path / "live"
    w = writer(live)
    w.start()
    try:
        append(w, 5)
        crashed = crashed_copy(live, tmp_path / "crashed", tail=b'{"seq":6,"prev":"ab')
    finally:
        w.stop()
    problem = verify(chain_files(crashed), KEY.encode()).problem
    assert problem is not None and problem.kind == "truncated"
    file = ActiveFile.open(crashed)  # moves the torn file aside, continues after it
    file.close()
    files = chain_files(crashed)
    assert len(files) == 2 and files[0].read_bytes().endswith(b'"prev":"ab')
    problem = verify(files, KEY.encode()).problem
    assert problem is not None and problem.kind == "truncated"
