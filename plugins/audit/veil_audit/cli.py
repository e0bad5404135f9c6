"""``veil audit``: check the audit trail, and report on it.

Exit codes of ``veil audit verify``: 0 the chain is intact, 1 a record was
edited, deleted, inserted, reordered or truncated (the first one is named),
2 usage error, 3 a file cannot be read, 4 the HMAC key is missing.

Exit codes of ``veil audit report``: 0 report written, 1 report written but
the files failed verification, 2 usage error, 3 a file cannot be read,
4 the key variable named with ``--key-env`` is missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .chain import KeyMissing, load_key
from .report import audit_files, parse_since, read_records, render_text, summarize
from .verify import Verdict, verify

__all__ = ["audit"]

EXIT_OK, EXIT_TAMPERED, EXIT_USAGE, EXIT_UNREADABLE, EXIT_NO_KEY = 0, 1, 2, 3, 4

_KEY_ENV = click.option(
    "--key-env",
    default="VEIL_AUDIT_HMAC_KEY",
    show_default=True,
    help="The environment variable holding the HMAC key the gateway wrote with.",
)


def _fail(code: int, message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _files(paths: tuple[Path, ...]) -> list[Path]:
    files = audit_files(paths)
    if not files:
        _fail(EXIT_UNREADABLE, "no audit files found there (audit.jsonl, audit-*.jsonl)")
    return files


@click.group(name="audit")
def audit() -> None:
    """Check the tamper-evident audit trail and report on it.

    \b
    Examples:
      veil audit verify /var/lib/veil/audit                # every file of a directory
      veil audit verify audit-000000000000-*.jsonl audit.jsonl --json
      veil audit report /var/lib/veil/audit --since 7d --format html --out report.html
      veil audit report /var/lib/veil/audit --since 2026-11-01 --team payments
    """


@audit.command(name="verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@_KEY_ENV
@click.option(
    "--partial",
    is_flag=True,
    help="Accept a chain that does not start at its first record (older files archived).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_command(paths: tuple[Path, ...], key_env: str, partial: bool, as_json: bool) -> None:
    """Check that no record was edited, deleted, inserted or reordered.

    PATHS are audit files or directories (every audit file in them); rotated
    files are put in chain order. The first problem is reported with its
    file, line, record number and request id. Exit 0: intact; 1: tampered.
    """
    try:
        key = load_key(key_env)
    except KeyMissing as e:
        _fail(EXIT_NO_KEY, str(e))
    files = _files(paths)
    try:
        verdict = verify(files, key, partial=partial)
    except OSError as e:
        _fail(EXIT_UNREADABLE, f"cannot read {e.filename}: {e.strerror}")
    if as_json:
        click.echo(json.dumps(verdict.to_json(), indent=2))
    else:
        click.echo(_describe(verdict))
    sys.exit(EXIT_OK if verdict.ok else EXIT_TAMPERED)


def _describe(v: Verdict) -> str:
    if v.problem is not None:
        p = v.problem
        return f"TAMPERED ({p.kind}): {p.message}"
    span = f"records {v.first_seq} to {v.last_seq}" if v.records else "no records"
    end = (
        "ends with a clean shutdown"
        if v.closed
        else "has no closing record yet (a gateway is writing it, or it stopped abruptly)"
    )
    return f"OK: {v.records} records in {len(v.files)} file(s), {span}; the chain {end}"


@audit.command(name="report")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--since", default="7d", show_default=True, help="7d, 24h, 30m, or a date.")
@click.option("--team", help="Only this team's calls.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "html", "json"]),
    default="text",
    show_default=True,
    help="html: one self-contained page with charts, for people; json: for machines.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report to this file (default: standard output).",
)
@_KEY_ENV
def report_command(
    paths: tuple[Path, ...],
    since: str,
    team: str | None,
    fmt: str,
    out: Path | None,
    key_env: str,
) -> None:
    """Spend by team, key and model over time; personal data found; refusals
    and errors; the signed policy versions in force.

    The files are verified first when the HMAC key is in the environment,
    and the report says whether they are intact.
    """
    try:
        start = parse_since(since)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    files = _files(paths)
    intact: bool | None = None
    try:
        key = load_key(key_env)
    except KeyMissing:
        integrity = f"not checked (set ${key_env} to the audit key to verify the files)"
    else:
        try:
            verdict = verify(files, key, partial=True)
        except OSError as e:
            _fail(EXIT_UNREADABLE, f"cannot read {e.filename}: {e.strerror}")
        intact = verdict.ok
        integrity = (
            f"verified: {verdict.records} records, none edited, deleted, inserted or reordered"
            if verdict.ok
            else f"FAILED: {_describe(verdict)}"
        )
    stats: dict[str, int] = {}
    try:
        summary = summarize(read_records(files, stats), start, team)
    except OSError as e:
        _fail(EXIT_UNREADABLE, f"cannot read {e.filename}: {e.strerror}")
    summary["integrity"] = {"intact": intact, "message": integrity}
    if fmt == "json":
        text = json.dumps(summary, indent=2)
    elif fmt == "html":
        from .html import render_html

        text = render_html(summary, integrity, intact)
    else:
        text = render_text(summary, integrity)
    if out is not None:
        out.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        click.echo(f"report written to {out}", err=True)
    else:
        click.echo(text)
    sys.exit(EXIT_TAMPERED if intact is False else EXIT_OK)
