"""``veil pii``: measure and try the detection a policy configures.

Exit codes: 0 ok; 1 unexpected failure; 2 usage error (bad option, unreadable
or malformed file); 3 the policy's ``[pii]`` section is invalid; 5 a
``--max-leak-rate`` gate failed.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson
from pydantic import ValidationError

from .settings import PiiSettings

__all__ = ["EXIT_GATE", "load_settings", "pii"]

EXIT_GATE = 5
DEMO_POLICY = Path("policies/demo.toml")


def _fail(message: str, code: int) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def load_settings(policy: Path | None) -> tuple[PiiSettings, str]:
    """The ``[pii]`` settings of a policy file (signature not checked: these
    commands only read detection settings), and where they came from.

    Without ``policy``: ``policies/demo.toml`` if it exists here, else the
    built-in defaults.
    """
    if policy is None:
        if not DEMO_POLICY.is_file():
            return PiiSettings(), "built-in defaults"
        policy = DEMO_POLICY
    try:
        document = tomllib.loads(policy.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        _fail(f"cannot read policy {policy}: {e}", 2)
    section = document.get("pii", {})
    try:
        return PiiSettings.model_validate(section), f"[pii] of {policy}"
    except ValidationError as e:
        _fail(f"the [pii] section of {policy} is invalid:\n{e}", 3)


def _detector(settings: PiiSettings) -> Any:
    from .detector import Detector, ModelNotInstalled

    try:
        return Detector(settings)
    except ModelNotInstalled as e:
        _fail(str(e), 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def pii() -> None:
    """Personal-data detection: evaluate it on labelled data, try it on text.

    \b
    Examples:
      veil pii eval --data dev.jsonl                 # leak rate, precision, recall
      veil pii eval --data dev.jsonl --json          # the same, as one JSON object
      veil pii eval --data dev.jsonl --max-leak-rate 0.05   # exit 5 above 5 %
      veil pii check "Write to Zoe Young at zoe@acme.com"
    """


@pii.command("eval")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSONL, one {"text", "spans": [{"start", "end", "type"}]} record a line.',
)
@click.option(
    "--policy",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Take detection settings from this policy's [pii] section "
    "(default: policies/demo.toml if present, else built-in defaults).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate the first N records only.")
@click.option(
    "--max-leak-rate",
    type=click.FloatRange(0, 1),
    help="Exit with code 5 if the overall leak rate is above this (a CI gate).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def eval_command(
    data: Path, policy: Path | None, limit: int | None, max_leak_rate: float | None, as_json: bool
) -> None:
    """Score detection on labelled text.

    Prints, per labelled type and overall: leak rate (share of labelled
    spans with any non-space character left in clear), precision, recall
    and F1 with overlap of the same type, and with overlap of any type. The
    overall leak rate counts the types the policy protects (redact, mask or
    block); types it does not detect are listed as such.
    """
    from .evaluate import evaluate, format_report, read_records

    settings, source = load_settings(policy)
    try:
        records = list(read_records(data))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        _fail(str(e), 2)
    if limit:
        records = records[:limit]
    click.echo(f"detection settings: {source}", err=True)
    detector = _detector(settings)
    with click.progressbar(
        length=len(records), label="analysing", file=sys.stderr, show_pos=True
    ) as bar:
        report = evaluate(records, detector.analyze, settings.acted_on, bar.update)
    report["settings"] = source
    if as_json:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(format_report(report))
    leak = report["leak_rate"]
    if max_leak_rate is not None and leak is not None and leak > max_leak_rate:
        click.secho(
            f"leak rate {leak:.4f} is above --max-leak-rate {max_leak_rate}", fg="red", err=True
        )
        sys.exit(EXIT_GATE)


@pii.command("check")
@click.argument("text", required=False)
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the text from this file instead ('-' is not supported: pass TEXT).",
)
@click.option(
    "--policy",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Take settings from this policy's [pii] section.",
)
@click.option("--json", "as_json", is_flag=True, help="Print findings and the result as JSON.")
def check_command(text: str | None, file: Path | None, policy: Path | None, as_json: bool) -> None:
    """Show what the policy would do to TEXT: the findings, and the text
    the upstream model would receive. Runs locally; nothing is sent."""
    from .placeholders import PlaceholderMap

    if (text is None) == (file is None):
        _fail("pass the text as an argument or with --file (one of them)", 2)
    if file is not None:
        text = file.read_text(encoding="utf-8")
    assert text is not None
    settings, _ = load_settings(policy)
    findings = _detector(settings).analyze(text)
    table = PlaceholderMap()
    out, pos, blocked = [], 0, []
    for f in findings:
        action = settings.action(f.entity_type)
        if action == "allow":
            continue
        if action == "block":
            blocked.append(f.entity_type)
        out.append(text[pos : f.start])
        out.append(
            f"<{f.entity_type}>"
            if action in {"mask", "block"}
            else table.assign(f.entity_type, text[f.start : f.end])
        )
        pos = f.end
    redacted = "".join(out) + text[pos:]
    shown: list[dict[str, Any]] = [
        {
            "type": f.entity_type,
            "start": f.start,
            "end": f.end,
            "score": round(f.score, 3),
            "action": settings.action(f.entity_type),
        }
        for f in findings
    ]
    result = {
        "findings": shown,
        "blocked": sorted(set(blocked)),
        "upstream_receives": None if blocked else redacted,
    }
    if as_json:
        click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    for f in shown:
        click.echo(
            f"{f['type']:<18} {f['action']:<7} score {f['score']:.2f}  [{f['start']}:{f['end']}]"
        )
    if blocked:
        click.secho(f"refused (400 pii_blocked): {', '.join(sorted(set(blocked)))}", fg="yellow")
    else:
        click.echo(f"\nupstream receives:\n{redacted}")
