"""``veil cache``: measure the semantic cache, read a gateway's cache, clear it.

- ``veil cache eval``: hit and false-hit rates of the semantic cache on
  labelled sentence pairs (exit 0, or 3 with ``--strict`` when the target is
  missed: false-hit rate at most 0.02 with a hit rate of at least 0.20);
- ``veil cache stats``: a running gateway's cache counters
  (``GET /admin/cache``, admin key);
- ``veil cache clear``: empty a running gateway's cache, for one team or all
  (``DELETE /admin/cache``, admin key);
- ``veil cache keygen``: a fresh encryption key for the Redis store.

Exit codes: 0 done, 1 the gateway refused or could not be reached, 2 usage
error, 3 a target was missed (``eval --strict``), 4 the data cannot be read.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import click
import httpx

__all__ = ["cache"]

_URL = click.option(
    "--url",
    envvar="VEIL_URL",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="The gateway's base URL (env VEIL_URL).",
)
_KEY = click.option(
    "--key",
    envvar="VEIL_ADMIN_KEY",
    required=True,
    help="An admin API key of the gateway (env VEIL_ADMIN_KEY).",
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@click.group()
def cache() -> None:
    """The answer cache: measure it, inspect it, clear it."""


def _admin(method: str, url: str, key: str, params: dict[str, str] | None = None) -> Any:
    try:
        r = httpx.request(
            method,
            url.rstrip("/") + "/admin/cache",
            params=params,
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )
    except httpx.HTTPError as e:
        click.echo(
            f"error: cannot reach the gateway at {url} ({type(e).__name__}); "
            "check --url and that `veil serve` runs",
            err=True,
        )
        sys.exit(1)
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        hint = " (does the policy run the cache plugin?)" if r.status_code == 404 else ""
        click.echo(f"error: the gateway answered {r.status_code}: {message}{hint}", err=True)
        sys.exit(1)
    return r.json()


@cache.command("stats")
@_URL
@_KEY
@_JSON
def stats_command(url: str, key: str, as_json: bool) -> None:
    """Show a running gateway's cache: entries, bytes, hits, misses.

    Counters are since the gateway started (the memory store) or shared by
    every replica (the Redis store).

    Example: veil cache stats --url http://127.0.0.1:8080 --key sk-veil-admin
    """
    doc = _admin("GET", url, key)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for k in (
        "store",
        "entries",
        "bytes",
        "hits",
        "semantic_hits",
        "misses",
        "stored",
        "bypassed",
        "hit_rate",
    ):
        if k in doc:
            click.echo(f"{k:<14} {doc[k]}")


@cache.command("clear")
@_URL
@_KEY
@click.option("--team", default=None, help="Clear only this team's entries (default: all).")
@_JSON
def clear_command(url: str, key: str, team: str | None, as_json: bool) -> None:
    """Delete cached answers from a running gateway's cache (all, or one team's).

    Example: veil cache clear --key sk-veil-admin --team payments
    """
    doc = _admin("DELETE", url, key, {"team": team} if team else None)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"deleted {doc['deleted']} entries" + (f" of team {team}" if team else ""))


@cache.command("keygen")
def keygen_command() -> None:
    """Print a new random key for the Redis store's encryption (base64).

    Put it in the environment variable the policy's key_env names
    (VEIL_CACHE_KEY by default), the same on every replica.
    """
    click.echo(base64.b64encode(secrets.token_bytes(32)).decode())


@cache.command("eval")
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='JSON lines {"a": ..., "b": ..., "same": true|false}; default: '
    "../shared/data/paraphrase/dev.jsonl (MRPC) when it exists.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Similarity at or above which the cache hits (default: the plugin's, 0.98).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N pairs.")
@click.option("--strict", is_flag=True, help="Exit 3 when the target is missed.")
@_JSON
def eval_command(
    data: Path | None, threshold: float | None, limit: int | None, strict: bool, as_json: bool
) -> None:
    """Measure the semantic cache's hit rate and false-hit rate on sentence pairs.

    For each pair, the answer to sentence a is cached and sentence b is asked:
    a same-meaning pair that hits is a saved call (hit_rate); a different-meaning
    pair that hits is a wrong answer served (false_hit_rate). Also prints a
    sweep of thresholds and the lowest one with false_hit_rate <= 0.02.

    Example: veil cache eval --limit 500 --json
    """
    from .evaluate import DEFAULT_DATA, DataError, evaluate, read_pairs
    from .settings import DEFAULT_THRESHOLD

    path = data if data is not None else DEFAULT_DATA
    if data is None and not path.exists():
        click.echo(
            f"error: no --data given and {path} does not exist (run from the repository root, "
            "or pass a JSON-lines file of labelled pairs)",
            err=True,
        )
        sys.exit(4)
    try:
        pairs = read_pairs(path, limit)
    except DataError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(4)
    from .embed import Embedder, EmbedderUnavailable

    try:
        embedder = Embedder()
    except EmbedderUnavailable as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(4)
    t = threshold if threshold is not None else DEFAULT_THRESHOLD
    # on stderr (stdout stays clean for --json), when someone watches
    with click.progressbar(
        length=2 * len(pairs),
        label=f"embedding {2 * len(pairs)} sentences",
        file=sys.stderr,
        hidden=not sys.stderr.isatty(),
    ) as bar:
        report = evaluate(pairs, embedder.embed_many, t, bar.update)
    report["data"] = str(path)
    met = report["false_hit_rate"] <= 0.02 and report["hit_rate"] >= 0.20
    report["target_met"] = met
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{report['pairs']} pairs ({report['same_pairs']} same meaning) from {path}")
        click.echo(
            f"threshold {t}: hit rate {report['hit_rate']:.3f}, false-hit rate "
            f"{report['false_hit_rate']:.3f}, wrong hits {report['wrong_hit_share']:.3f}"
        )
        click.echo(
            "sweep: "
            + "; ".join(
                f"{r['threshold']}: {r['hit_rate']:.3f}/{r['false_hit_rate']:.3f}"
                for r in report["sweep"]
            )
        )
        click.echo(f"suggested threshold (false-hit <= 0.02): {report['suggested_threshold']}")
        click.echo("target (false-hit <= 0.02, hit >= 0.20): " + ("met" if met else "MISSED"))
    if strict and not met:
        sys.exit(3)
