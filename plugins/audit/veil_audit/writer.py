"""The writer thread: group commit of sealed records to the sinks.

The event loop hands a record (a dict) and a future to :meth:`Writer.submit_soon`
and awaits the future; it never touches a file. The writer thread takes
every record waiting (up to ``max_batch``), serializes and seals each into
the chain, appends the batch to the active file with one ``write(2)``
(``fsync`` too when the policy says so), copies it to the other sinks, and
then resolves the batch's futures on their loop with one wake-up. So a call
whose record is awaited is answered only once its record is in the file
(the OS page cache at least), and concurrent calls share one write.

A write that fails (full disk, I/O error) is cut back out of the file, the
chain is rewound, and the batch's futures resolve to ``False``: the stage
then refuses or serves the calls as the policy says. The next batch tries
again.
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
_DUMPS = orjson.dumps


class WriterStats:
    """Counters the writer thread updates (read by the metrics collector)."""

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
    closing record, and joins."""

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
        self.rotate_bytes = int(settings.rotate_mb * 1_000_000)
        self.rotate_seconds = settings.rotate_hours * 3600
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="veil-audit-writer", daemon=True)
        self.healthy = True
        self.stats = WriterStats()
        self._pending: dict[asyncio.AbstractEventLoop, list[Any]] = {}

    # -- lifecycle (event loop side) ------------------------------------------------

    def start(self) -> None:
        """Open the active file (continuing the chain on disk), write an
        ``audit_opened`` record, start the thread.

        :raises DirectoryBusy: another process writes the directory.
        :raises OSError: the directory cannot be written.
        """
        if self.directory is not None:
            self.file = ActiveFile.open(self.directory)
            self.chain.restore((self.file.next_seq, self.file.prev))
        if not self._write([self._marker("audit_opened")]):
            if self.file is not None:
                self.file.close()
            raise OSError("cannot write the audit_opened record; see the log")
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then an ``audit_closed`` record; close. Blocking."""
        if self.thread.is_alive():
            self.queue.put(_STOP)
            self.thread.join(timeout)
            if self.thread.is_alive():  # stuck on a write: leave the file to it
                log.error("audit_writer_stuck", timeout_s=timeout)
                return
        self._write([self._marker("audit_closed", reason="shutdown")])
        if self.file is not None:
            self.file.close()
            self.file = None

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

    # -- the thread -------------------------------------------------------------------

    def _marker(self, event: str, **extra: Any) -> tuple[dict[str, Any], None]:
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
            batch = list(item)
            while len(batch) < self.max_batch:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.extend(item)
            for start in range(0, len(batch), self.max_batch):
                part = batch[start : start + self.max_batch]
                try:
                    self._write(part)
                except Exception as e:  # noqa: BLE001 - the thread must survive anything
                    log.error("audit_writer_failed", error=type(e).__name__)
                    self._resolve(part, False)

    def _write(self, batch: list[tuple[dict[str, Any], asyncio.Future[bool] | None]]) -> bool:
        chain = self.chain
        state = chain.state()
        seal = chain.seal
        data = b"".join([seal(_DUMPS(record)) for record, _ in batch])
        ok = True
        try:
            if self.file is not None:
                self.file.write(data)
                if self.fsync:
                    self.file.sync()
            elif self.stdout_fd is not None:
                _write_all(self.stdout_fd, data)
        except OSError as e:
            chain.restore(state)
            ok = False
            self.stats.failed_batches += 1
            self.stats.dropped += len(batch)
            if self.healthy:
                log.error("audit_sink_failed", error=type(e).__name__, errno=e.errno)
            self.healthy = False
        if ok:
            if not self.healthy:
                log.warning("audit_sink_recovered")
            self.healthy = True
            self.stats.records += len(batch)
            self.stats.batches += 1
            if self.file is not None and self.stdout_fd is not None:
                try:
                    _write_all(self.stdout_fd, data)
                except OSError:
                    self._secondary_error("stdout")
        self._resolve(batch, ok)
        if ok and self.span_sink is not None:
            for record, _ in batch:
                try:
                    self.span_sink(record)
                except Exception:  # noqa: BLE001 - a broken exporter never fails a call
                    self._secondary_error("otel")
        if ok and self.file is not None and self.file.due(self.rotate_bytes, self.rotate_seconds):
            self._rotate()
        return ok

    def _rotate(self) -> None:
        assert self.file is not None
        closing = self.chain.seal(_DUMPS(self._marker("audit_rotated")[0]))
        try:
            self.file.write(closing)
            self.file.rotate(self.chain.seq)
        except OSError as e:
            log.error("audit_rotation_failed", error=type(e).__name__)
            return
        opened = self.chain.seal(_DUMPS(self._marker("audit_opened")[0]))
        try:
            self.file.write(opened)
        except OSError as e:  # the next batch reports the sink as failed if it persists
            log.error("audit_rotation_failed", error=type(e).__name__)

    def _resolve(
        self, batch: list[tuple[dict[str, Any], asyncio.Future[bool] | None]], ok: bool
    ) -> None:
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
