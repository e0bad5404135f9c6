"""The policy's ``[audit]`` section, validated.

Example::

    [plugins.audit]
    fail = "closed"              # a sink that cannot write refuses calls; "open" serves
                                 # them and counts the dropped records

    [audit]
    sinks = ["file"]             # any of "file", "stdout", "otel"
    path = "audit"               # directory of the JSONL files (relative: under the
                                 # gateway's state directory)
    rotate_mb = 100              # start a new file past this size ...
    rotate_hours = 24            # ... or this age (0 disables either)
    fsync = false                # true: fsync every batch before its calls are answered
    preallocate_mb = 4           # the active file grows by this much, allocated ahead
    hmac_key_env = "VEIL_AUDIT_HMAC_KEY"
    user_ids = "pseudonym"       # the request's `user` field: "pseudonym", "omit" or "clear"
    store_redacted_prompts = false

Values a policy gets wrong (an unknown sink, a negative size) make the
policy invalid, with the field named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["AuditSettings", "Sink"]

Sink = Literal["file", "stdout", "otel"]


class AuditSettings(BaseModel):
    """The ``[audit]`` section.

    :param sinks: where records go: ``file`` (hash-chained JSONL files, the
        default), ``stdout`` (the same lines on the gateway's standard
        output), ``otel`` (a span per call through the OpenTelemetry SDK's
        global tracer provider; needs ``veil-audit[otel]``).
    :param path: the directory of the JSONL files; relative paths are under
        the gateway's state directory (``VEIL_STATE_DIR``), else the working
        directory. One gateway process per directory.
    :param rotate_mb: a file past this many megabytes is closed and a new
        one started (0: never by size).
    :param rotate_hours: a file older than this is closed and a new one
        started (0: never by age).
    :param fsync: ``fsync`` each batch before the calls in it are answered
        (survives power loss, costs a disk flush per batch and a hand-off to
        the writer thread). Without it, a record is copied into the
        memory-mapped active file (the OS page cache: survives the gateway
        process being killed) on the event loop before its call is answered.
    :param preallocate_mb: the active file is allocated on disk this many
        megabytes at a time, ahead of the records, by the writer thread: a
        record's copy then never meets a full disk or a page fault. A full
        disk (or a file-size limit) shows when the file cannot grow: the
        records fail once the allocated room is used up.
    :param max_batch: at most this many records per write (group commit).
    :param hmac_key_env: the environment variable holding the HMAC key (at
        least 16 bytes) that authenticates every record. Never put the key
        in the policy.
    :param user_ids: how the request's ``user`` field is recorded: a keyed
        ``pseudonym`` (the default; the same user always gets the same one),
        ``omit``, or ``clear`` (only where that id is not personal data).
    :param store_redacted_prompts: also record the request's messages as the
        upstream saw them, for debugging. Needs the ``pii`` stage in front
        of ``audit`` in the pipeline, and is recorded only for calls ``pii``
        scanned. Off by default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sinks: Annotated[list[Sink], Field(min_length=1)] = ["file"]
    path: Annotated[str, Field(min_length=1)] = "audit"
    rotate_mb: Annotated[float, Field(ge=0)] = 100.0
    rotate_hours: Annotated[float, Field(ge=0)] = 24.0
    fsync: bool = False
    preallocate_mb: Annotated[float, Field(gt=0, le=1024)] = 4.0
    max_batch: Annotated[int, Field(gt=0, le=100_000)] = 512
    hmac_key_env: Annotated[str, Field(min_length=1)] = "VEIL_AUDIT_HMAC_KEY"
    user_ids: Literal["pseudonym", "omit", "clear"] = "pseudonym"
    store_redacted_prompts: bool = False

    @field_validator("sinks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a sink twice")
        return v

    def directory(self, state_dir: Path | None = None) -> Path:
        """The files' directory: absolute, or under ``state_dir`` (default
        ``$VEIL_STATE_DIR``, else the working directory)."""
        path = Path(self.path)
        if not path.is_absolute():
            path = (state_dir or Path(os.environ.get("VEIL_STATE_DIR") or ".")) / path
        return path
