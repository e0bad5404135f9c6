"""The ``audit`` stage: one sealed record per call, written before the call
is answered.

The record is built in ``on_finish`` (a core stage method that runs once per
call, after every ``on_response`` or every ``on_error``): the pipeline runs
``audit`` last on the request path, so on the response path its
``on_response`` would run *first*, before budget settles the cost or any
earlier stage records what it did; ``on_finish`` sees the finished call. It
copies the sealed record into the memory-mapped active file (or, with
``fsync``, hands it to the writer thread and awaits the batch's group
commit), so the event loop never blocks on a file and the client gets its
answer only once the record is in the file.

If the record cannot be written, the policy decides: with ``fail =
"closed"`` (the default) a call that had succeeded is refused with 503
``audit_unavailable`` (its failure record is then tried once more); with
``fail = "open"`` the call is served, the record counted in
``veil_audit_records_total{result="dropped"}`` and logged by request id.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog

from veil import Call, Unavailable

from .chain import Mac, load_key
from .metrics import AuditMetrics
from .record import RuntimeFacts, build_record
from .settings import AuditSettings
from .writer import Writer

__all__ = ["AuditStage", "AuditUnavailable", "acquire_writer", "release_writer"]

log = structlog.get_logger("veil.audit")

_SCRATCH = "audit"


class AuditUnavailable(Unavailable):
    """503 ``audit_unavailable``: the record of the call cannot be written."""

    code = "audit_unavailable"


_writers: dict[str, tuple[Writer, int]] = {}


def _destination(settings: AuditSettings, state_dir: Path | None) -> tuple[str, Path | None]:
    if "file" in settings.sinks:
        directory = settings.directory(state_dir).resolve()
        return str(directory), directory
    return "stdout", None


def acquire_writer(
    settings: AuditSettings, key: bytes, version: str, state_dir: Path | None = None
) -> Writer:
    """The process's writer for the settings' destination, started on first
    use and shared by later policy loads (the chain of a directory has one
    writer). Settings other than the destination take effect when the last
    user released it (a restart).

    :raises DirectoryBusy: another process writes the directory.
    :raises OtelMissing: ``otel`` is a sink but the SDK is not installed.
    :raises OSError: the directory cannot be written.
    """
    name, directory = _destination(settings, state_dir)
    found = _writers.get(name)
    if found is not None:
        _writers[name] = (found[0], found[1] + 1)
        return found[0]
    span_sink = None
    if "otel" in settings.sinks:
        from .otel import span_sink as make

        span_sink = make(version)
    writer = Writer(settings, key, directory=directory, span_sink=span_sink)
    writer.start()
    _writers[name] = (writer, 1)
    return writer


async def release_writer(writer: Writer) -> None:
    """Give ``writer`` back; the last user stops it (drain, closing record)."""
    for name, (w, users) in list(_writers.items()):
        if w is writer:
            if users > 1:
                _writers[name] = (w, users - 1)
                return
            del _writers[name]
            await asyncio.to_thread(w.stop)
            return


class AuditStage:
    """See the module doc. One per policy load; the writer is shared."""

    name = "audit"

    def __init__(self, settings: AuditSettings, *, fail_open: bool = False) -> None:
        self.settings = settings
        self.fail_open = fail_open
        self.writer: Writer | None = None
        self.metrics: AuditMetrics | None = None
        self.facts: RuntimeFacts | None = None
        self.prompts = settings.store_redacted_prompts

    async def start(self, runtime: Any, metrics: AuditMetrics | None, version: str) -> None:
        """Load the key, check the pipeline, open (or share) the writer.

        :raises KeyMissing: the HMAC key is not in the environment.
        :raises ValueError: ``store_redacted_prompts`` without ``pii`` before ``audit``.
        """
        key = load_key(self.settings.hmac_key_env)
        pipeline = list(runtime.policy.gateway.pipeline)
        if self.prompts and not (
            "pii" in pipeline and pipeline.index("pii") < pipeline.index(self.name)
        ):
            raise ValueError(
                "[audit] store_redacted_prompts needs the pii stage before audit in "
                '[gateway] pipeline (e.g. pipeline = ["pii", ..., "audit"]), or prompts '
                "would be stored unredacted"
            )
        self.metrics = metrics
        self.facts = RuntimeFacts(
            runtime.policy, runtime.host.versions, Mac(b"pseudonym:" + key), self.settings.user_ids
        )
        self.writer = acquire_writer(self.settings, key, version)

    async def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            await release_writer(writer)

    async def on_finish(self, call: Call) -> None:
        """Write the call's record (see the module doc).

        :raises AuditUnavailable: 503, the record could not be written and
            the policy fails the stage closed.
        """
        scratch = call.scratch
        if scratch.get(_SCRATCH):
            return
        writer, facts = self.writer, self.facts
        if writer is None or facts is None:
            raise AuditUnavailable("the audit trail is not started; the call was not answered")
        record = build_record(call, facts, prompts=self.prompts)
        if writer.direct:
            written = writer.append(record)
        else:
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            writer.submit_soon(record, future)
            written = await future
        metrics = self.metrics
        if metrics is not None:
            metrics.observe(record)
            (metrics.written if written else metrics.dropped).inc()
        if written:
            scratch[_SCRATCH] = True
            return
        log.error("audit_record_dropped", request_id=call.id, fail_open=self.fail_open)
        if not self.fail_open and call.error is None:
            raise AuditUnavailable(
                "the audit record of this call cannot be written, and the policy refuses "
                f"calls it cannot audit; request id {call.id}"
            )
