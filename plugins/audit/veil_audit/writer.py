"""The writer: sealed records into the chain's active file, before each
call is answered, without blocking the event loop.

With a file sink and no ``fsync`` (the defaults), :meth:`Writer.append`
seals a record and copies it into the memory-mapped active file on the
event loop: a copy into the OS page cache (it survives the gateway being
killed), no system call and no wake-up of another thread. The writer
thread keeps the copies cheap and safe: it allocates and faults in the
file's next chunk well before the records reach it (a full disk is found
then, not mid-record), rotates the file, and feeds the secondary sinks
(stdout, OpenTelemetry spans), which may block.

With ``fsync = true``, or stdout as the only sink, the event loop hands a
record and a future to :meth:`Writer.submit_soon` and awaits the future:
the thread takes every record waiting (up to ``max_batch``), seals them,
appends the batch, ``fsync``s it when the policy says so, and resolves the
batch's futures on their loop with one wake-up (group commit).

A write that fails (full disk, I/O error) leaves no partial record: the
chain is rewound and the record reported not written; the stage then
refuses or serves the call as the policy says. The next record tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import structlog

from .chain import Chain, key_id
from .files import ActiveFile
from .settings import AuditSettings

__all__ = ["Writer", "WriterStats"]

log = structlog.get_logger("veil.audit")

_STOP = object()
_MAINTAIN = object()
_DUMPS = orjson.dumps

Entry = tuple[dict[str, Any], "asyncio.Future[bool] | None"]


class WriterStats:
    """Counters the writer updates (read by the metrics collector)."""

    __slots__ = ("batches", "failed_batches", "records", "secondary_errors", "dropped")

    def __init__(self) -> None:
        self.batches = 0
        self.failed_batches = 0
        self.records = 0
        self.dropped = 0
        self.secondary_errors: dict[str, int] = {}


def _settle(futures: list[asyncio.Future[bool]], ok: bool) -> None:
    for f in futures:
        if not f.done():
            f.set_result(ok)


class Writer:
    """One per audit destination (directory, or stdout alone), shared by
    every policy load of the process. :meth:`start` opens the files and
    starts the thread; :meth:`stop` drains, closes the chain's file with a
    closing record, and joins. ``direct`` says whether the stage appends
    with :meth:`append` (else :meth:`submit_soon`). ``lock`` serializes the
    chain and the active file between the event loop and the thread."""

    def __init__(
        self,
        settings: AuditSettings,
        key: bytes,
        *,
        directory: Path | None,
        span_sink: Callable[[dict[str, Any]], None] | None = None,
        stdout_fd: int = 1,
    ) -> None:
        self.settings = settings
        self.key_id = key_id(key)
        self.directory = directory
        self.file: ActiveFile | None = None
        self.chain = Chain(key)
        self.stdout_fd = stdout_fd if "stdout" in settings.sinks else None
        self.span_sink = span_sink
        self.max_batch = settings.max_batch
        self.fsync = settings.fsync
        self.direct = directory is not None and not settings.fsync
        self.chunk = max(1, int(settings.preallocate_mb * 1_000_000))
        self.rotate_bytes = int(settings.rotate_mb * 1_000_000)
        self.rotate_seconds = settings.rotate_hours * 3600
        self.lock = threading.Lock()
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="veil-audit-writer", daemon=True)
        self.healthy = True
        self.stats = WriterStats()
        self._pending: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        self._secondary: list[tuple[dict[str, Any], bytes]] = []
        self._maintaining = False
        self._next_check = 0.0

    # -- lifecycle (event loop side) ------------------------------------------------

    def start(self) -> None:
        """Open the active file (continuing the chain on disk), write an
        ``audit_opened`` record, start the thread.

        :raises DirectoryBusy: another process writes the directory.
        :raises OSError: the directory cannot be written.
        """
        if self.directory is not None:
            self.file = ActiveFile.open(self.directory, self.chunk)
            self.chain.restore((self.file.next_seq, self.file.prev))
        if not self._write([self._marker("audit_opened")], maintain=False):
            if self.file is not None:
                self.file.close()
            raise OSError("cannot write the audit_opened record; see the log")
        self.thread.start()
        if self.file is not None:
            self._poke()  # fault the first chunk in

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then an ``audit_closed`` record; close. Blocking."""
        if self.thread.is_alive():
            self.queue.put(_STOP)
            self.thread.join(timeout)
            if self.thread.is_alive():  # stuck on a write: leave the file to it
                log.error("audit_writer_stuck", timeout_s=timeout)
                return
        items = self._take_secondary()
        self._feed_secondary([d for _, d in items], [r for r, _ in items])
        self._write([self._marker("audit_closed", reason="shutdown")], maintain=False)
        if self.file is not None:
            with self.lock:
                self.file.close()
                self.file = None

    def append(self, record: dict[str, Any]) -> bool:
        """Seal ``record`` and copy it into the active file now (``direct``
        writers only; event loop side). True when it is in the file.

        The copy neither blocks nor makes a system call while the thread
        keeps room ahead of it; when the room runs out anyway (the thread
        fell behind, or the disk is full), the file grows here, once.
        """
        if self.file is None:  # stopped
            return False
        data = self._commit([(record, None)])
        if data is None:
            return False
        if self.stdout_fd is not None or self.span_sink is not None:
            if not self._secondary:
                asyncio.get_running_loop().call_soon(self._flush_secondary)
            self._secondary.append((record, data))
        file = self.file
        if not self._maintaining and file is not None:
            if (
                file.room() < self.chunk // 2
                or file.populated < file.capacity  # grown here: fault the new room in
                or (self.rotate_bytes and file.size >= self.rotate_bytes)
            ):
                self._poke()
            elif self.rotate_seconds:
                now = time.monotonic()
                if now >= self._next_check:
                    self._next_check = now + 1.0
                    if file.due(0, self.rotate_seconds):
                        self._poke()
        return True

    def submit(self, record: dict[str, Any], future: asyncio.Future[bool] | None) -> None:
        """Queue ``record`` (from any thread); ``future`` (if any) resolves to
        whether it was written."""
        self.queue.put([(record, future)])

    def submit_soon(self, record: dict[str, Any], future: asyncio.Future[bool]) -> None:
        """Queue ``record`` from its event loop: the records a loop submits in
        one iteration reach the thread together, with one wake-up."""
        loop = future.get_loop()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._flush, loop)
        pending.append((record, future))

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending.pop(loop, None)
        if batch:
            self.queue.put(batch)

    def _flush_secondary(self) -> None:
        items = self._take_secondary()
        if items:
            self.queue.put(("secondary", items))

    def _take_secondary(self) -> list[tuple[dict[str, Any], bytes]]:
        items, self._secondary = self._secondary, []
        return items

    def _poke(self) -> None:
        self._maintaining = True
        self.queue.put(_MAINTAIN)

    # -- sealing and appending (either side, under the lock) -------------------------

    def _commit(self, batch: list[Entry]) -> bytes | None:
        """Seal ``batch`` and append it to the file (else stdout): the bytes
        written, or ``None`` when the write failed (the chain rewound)."""
        with self.lock:
            chain = self.chain
            state = chain.state()
            seal = chain.seal
            data = b"".join([seal(_DUMPS(record)) for record, _ in batch])
            try:
                if self.file is not None:
                    self.file.write(data)
                    if self.fsync:
                        self.file.sync()
                elif self.stdout_fd is not None:
                    _write_all(self.stdout_fd, data)
            except OSError as e:
                chain.restore(state)
                self.stats.failed_batches += 1
                self.stats.dropped += len(batch)
                if self.healthy:
                    log.error("audit_sink_failed", error=type(e).__name__, errno=e.errno)
                self.healthy = False
                return None
            if not self.healthy:
                log.warning("audit_sink_recovered")
            self.healthy = True
            self.stats.records += len(batch)
            self.stats.batches += 1
            return data

    # -- the thread -------------------------------------------------------------------

    def _marker(self, event: str, **extra: Any) -> Entry:
        record = {
            "event": event,
            "timestamp": _now(),
            "key_id": self.key_id,
            "pid": os.getpid(),
            **extra,
        }
        return record, None

    def _run(self) -> None:
        get, get_nowait = self.queue.get, self.queue.get_nowait
        stopping = False
        while not stopping:
            item = get()
            if item is _STOP:
                break
            if item is _MAINTAIN:
                self._guarded(self._maintain)
                continue
            if isinstance(item, tuple):
                items = item[1]
                self._guarded(self._feed_secondary, [d for _, d in items], [r for r, _ in items])
                continue
            batch = list(item)
            while len(batch) < self.max_batch:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                if item is _MAINTAIN or isinstance(item, tuple):
                    self.queue.put(item)  # after this batch
                    break
                batch.extend(item)
            for start in range(0, len(batch), self.max_batch):
                part = batch[start : start + self.max_batch]
                try:
                    self._write(part)
                except Exception as e:  # noqa: BLE001 - the thread must survive anything
                    log.error("audit_writer_failed", error=type(e).__name__)
                    self._resolve(part, False)

    def _guarded(self, work: Callable[..., None], *args: Any) -> None:
        try:
            work(*args)
        except Exception as e:  # noqa: BLE001 - the thread must survive anything
            log.error("audit_writer_failed", error=type(e).__name__)

    def _write(self, batch: list[Entry], *, maintain: bool = True) -> bool:
        """Commit ``batch``, resolve its futures, feed the secondary sinks,
        then grow or rotate the file when due (thread side; at start and
        stop for the markers, with ``maintain=False``)."""
        data = self._commit(batch)
        self._resolve(batch, data is not None)
        if data is None:
            return False
        self._feed_secondary([data], [record for record, _ in batch])
        if maintain:
            self._maintain()
        return True

    def _feed_secondary(self, chunks: list[bytes], records: list[dict[str, Any]]) -> None:
        """Copy written records (``chunks``: their sealed bytes) to stdout,
        when the file is the main sink, and ``records`` to the span sink."""
        if self.file is not None and self.stdout_fd is not None:
            for data in chunks:
                try:
                    _write_all(self.stdout_fd, data)
                except OSError:
                    self._secondary_error("stdout")
        if self.span_sink is not None:
            for record in records:
                try:
                    self.span_sink(record)
                except Exception:  # noqa: BLE001 - a broken exporter never fails a call
                    self._secondary_error("otel")

    def _maintain(self) -> None:
        """Keep half a chunk of room ahead of the records, rotate when due,
        and fault the room's pages in, a step at a time (letting the event
        loop have the GIL between steps)."""
        try:
            file = self.file
            if file is None:
                return
            if file.room() < self.chunk // 2:
                with self.lock:
                    try:
                        file.grow()
                    except OSError as e:  # the appends fail when the room is gone
                        log.warning("audit_file_cannot_grow", error=type(e).__name__, errno=e.errno)
            if file.due(self.rotate_bytes, self.rotate_seconds):
                self._rotate()
            while file.populate():
                time.sleep(0)
        finally:
            self._maintaining = False

    def _rotate(self) -> None:
        """Close the active file with an ``audit_rotated`` record and start
        the next one with ``audit_opened``; the old file's ``fsync`` runs
        outside the lock."""
        with self.lock:
            file = self.file
            assert file is not None
            state = self.chain.state()
            try:
                file.write(self.chain.seal(_DUMPS(self._marker("audit_rotated")[0])))
            except OSError as e:
                self.chain.restore(state)
                log.error("audit_rotation_failed", error=type(e).__name__)
                return
            try:
                old_fd = file.rotate(self.chain.seq)
            except OSError as e:  # still the same file, which the marker does not end
                log.error("audit_rotation_failed", error=type(e).__name__)
                return
            state = self.chain.state()
            try:
                file.write(self.chain.seal(_DUMPS(self._marker("audit_opened")[0])))
            except OSError as e:  # the next record reports the sink as failed if it persists
                self.chain.restore(state)
                log.error("audit_rotation_failed", error=type(e).__name__)
        try:
            os.fsync(old_fd)
        except OSError as e:
            log.error("audit_rotation_failed", error=type(e).__name__, errno=e.errno)
        finally:
            os.close(old_fd)

    def _resolve(self, batch: list[Entry], ok: bool) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]] = {}
        for _, future in batch:
            if future is not None:
                by_loop.setdefault(future.get_loop(), []).append(future)
        for loop, futures in by_loop.items():
            # a closed loop raises RuntimeError: nobody waits any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, futures, ok)

    def _secondary_error(self, sink: str) -> None:
        errors = self.stats.secondary_errors
        errors[sink] = errors.get(sink, 0) + 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
