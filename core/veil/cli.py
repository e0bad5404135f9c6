"""The ``veil`` command line.

Exit codes: 0 success; 1 unexpected failure; 2 usage error; 3 policy refused
(bad signature, expired, wrong audience, rollback, invalid); 4 plugin error
(missing, broken, wrong version).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson

from .errors import PluginError, PolicyError

__all__ = ["EXIT_PLUGIN", "EXIT_POLICY", "EXIT_START", "cli", "main"]

EXIT_POLICY = 3
EXIT_PLUGIN = 4
EXIT_START = 5
"""A plugin could not start (a missing key, an unreachable store, ...)."""


def _fail(message: str, code: int) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def _emit(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="veil", prog_name="veil")
def cli() -> None:
    """veil: a privacy-first, OpenAI-compatible LLM gateway.

    \b
    Quick start (a local demo with the built-in mock model):
      veil policy keygen --out .veil/keys
      veil policy sign policies/demo.toml --key .veil/keys/veil-policy.key
      veil serve --policy policies/demo.toml --trusted-key .veil/keys/veil-policy.pub \\
                 --audience demo

    Exit codes: 0 ok, 1 failure, 2 usage error, 3 policy refused, 4 plugin error.
    """


# -- policy --------------------------------------------------------------------


@cli.group()
def policy() -> None:
    """Create signing keys, sign, verify and inspect policy files."""


@policy.command("keygen")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for veil-policy.key (private, mode 0600) and veil-policy.pub.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def policy_keygen(out_dir: Path, force: bool, as_json: bool) -> None:
    """Create an Ed25519 key pair for signing policies.

    Keep the private key with whoever approves policies (compliance); give the
    public key to every gateway (--trusted-key).
    """
    from .policy.signing import generate_keypair, key_id, load_private_key

    try:
        priv, pub = generate_keypair(out_dir, overwrite=force)
    except FileExistsError as e:
        _fail(f"{e} already exists; pass --force to replace it (old signatures stop verifying)", 1)
    kid = key_id(load_private_key(priv).public_key())
    _emit(
        {"private_key": str(priv), "public_key": str(pub), "key_id": kid},
        as_json,
        f"private key: {priv}\npublic key:  {pub}\nkey id:      {kid}",
    )


@policy.command("sign")
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The private key (from `veil policy keygen`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def policy_sign(policy_file: Path, key_path: Path, as_json: bool) -> None:
    """Sign POLICY_FILE; writes POLICY_FILE.sig beside it.

    The policy is parsed first, so an invalid policy is never signed. The
    signature covers the file's exact bytes: any later edit voids it.
    """
    from .policy import load_private_key, parse_policy, sign_file
    from .policy.signing import key_id

    try:
        parsed = parse_policy(policy_file.read_bytes(), source=str(policy_file))
        key = load_private_key(key_path)
    except PolicyError as e:
        _fail(str(e), EXIT_POLICY)
    out = sign_file(policy_file, key)
    _emit(
        {"signature": str(out), "key_id": key_id(key.public_key()), "version": parsed.version},
        as_json,
        f"signed {policy_file} (version {parsed.version}) -> {out}",
    )


@policy.command("verify")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--trusted-key",
    "trusted",
    multiple=True,
    required=True,
    help="Trusted public key file or directory of *.pub (repeatable).",
)
@click.option("--audience", help="Also check the policy is for this audience.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also check against the versions already accepted there (rollback).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def policy_verify(
    policy_file: Path,
    trusted: tuple[str, ...],
    audience: str | None,
    state_dir: Path | None,
    as_json: bool,
) -> None:
    """Check POLICY_FILE's signature, validity window (and audience, rollback).

    Exits 0 when a gateway would accept it, 3 when it would refuse it.
    """
    from .policy import RollbackGuard, TrustedKeys, load_policy

    try:
        keys = TrustedKeys.from_paths(trusted)
        p = load_policy(
            policy_file,
            keys,
            audience=audience,
            guard=RollbackGuard(state_dir) if state_dir else None,
        )
    except PolicyError as e:
        if as_json:
            click.echo(orjson.dumps({"valid": False, "error": str(e)}).decode())
            sys.exit(EXIT_POLICY)
        _fail(str(e), EXIT_POLICY)
    _emit(
        {
            "valid": True,
            "version": p.version,
            "issuer": p.issuer,
            "audience": p.audience,
            "expires_at": p.expires_at.isoformat(),
            "sha256": p.digest,
        },
        as_json,
        f"OK: {policy_file} version {p.version}, audience {p.audience!r}, issuer {p.issuer}, "
        f"expires {p.expires_at.isoformat()}",
    )


@policy.command("show")
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def policy_show(policy_file: Path, as_json: bool) -> None:
    """Summarize POLICY_FILE (does not check the signature: use `verify`)."""
    from .policy import parse_policy

    try:
        p = parse_policy(policy_file.read_bytes(), source=str(policy_file))
    except PolicyError as e:
        _fail(str(e), EXIT_POLICY)
    data = {
        "version": p.version,
        "issuer": p.issuer,
        "audience": p.audience,
        "issued_at": p.issued_at.isoformat(),
        "expires_at": p.expires_at.isoformat(),
        "pipeline": list(p.gateway.pipeline),
        "plugins": list(p.plugins),
        "teams": sorted(p.teams),
        "keys": len(p.keys),
        "models": {name: [d.model for d in deps] for name, deps in p.models.items()},
    }
    lines = [
        f"version {p.version}  audience {p.audience!r}  issuer {p.issuer}",
        f"valid {p.issued_at.isoformat()} .. {p.expires_at.isoformat()}",
        f"pipeline: {' -> '.join(p.gateway.pipeline) or '(core only)'}",
        f"teams: {', '.join(sorted(p.teams)) or '-'}   keys: {len(p.keys)}",
        "models: " + (", ".join(p.models) or "-"),
    ]
    _emit(data, as_json, "\n".join(lines))


# -- keys ----------------------------------------------------------------------


@cli.group()
def key() -> None:
    """Create API keys for teams."""


@key.command("new")
@click.option("--team", required=True, help="The team the key belongs to (a [[teams]] id).")
@click.option("--id", "key_id_", help="An id for the key (default: <team>-<random>).")
@click.option("--admin", is_flag=True, help="Let the key reach /-/* and /admin/* routes.")
@click.option("--json", "as_json", is_flag=True, help="Print the key and hash as JSON.")
def key_new(team: str, key_id_: str | None, admin: bool, as_json: bool) -> None:
    """Print a new API key and the [[keys]] entry to paste into a policy.

    The key itself is shown once and never stored: the policy holds only its
    SHA-256.
    """
    api_key = "sk-veil-" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    kid = key_id_ or f"{team}-{secrets.token_hex(3)}"
    toml = f'[[keys]]\nid = "{kid}"\nteam = "{team}"\nsha256 = "{digest}"\n'
    if admin:
        toml += "admin = true\n"
    _emit(
        {"key": api_key, "id": kid, "team": team, "sha256": digest, "admin": admin, "toml": toml},
        as_json,
        f"API key (shown once, give it to the team): {api_key}\n\nAdd to the policy:\n\n{toml}",
    )


# -- plugins -------------------------------------------------------------------


@cli.command("plugins")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Mark which plugins this policy activates (signature not checked).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def plugins_cmd(policy_file: Path | None, as_json: bool) -> None:
    """List installed plugins (entry-point group `veil`) without importing them.

    With --policy, mark which the policy activates; exits 4 when the policy
    names a plugin that is not installed.
    """
    from .plugins import installed_plugins
    from .policy import parse_policy

    active: tuple[str, ...] = ()
    pipeline: list[str] = []
    if policy_file is not None:
        try:
            p = parse_policy(policy_file.read_bytes(), source=str(policy_file))
        except PolicyError as e:
            _fail(str(e), EXIT_POLICY)
        active, pipeline = p.plugins, list(p.gateway.pipeline)
    rows = [
        {
            "name": i.name,
            "distribution": i.distribution,
            "version": i.version,
            "active": i.name in active,
            "position": pipeline.index(i.name) if i.name in pipeline else None,
        }
        for i in installed_plugins()
    ]
    installed = {r["name"] for r in rows}
    missing = [n for n in active if n not in installed]
    if as_json:
        click.echo(orjson.dumps({"plugins": rows, "missing": missing}, option=orjson.OPT_INDENT_2))
        sys.exit(EXIT_PLUGIN if missing else 0)
    if not rows:
        click.echo("no plugins installed (entry-point group 'veil')")
    for r in rows:
        mark = "active" if r["active"] else ("-" if policy_file else "")
        click.echo(
            f"{r['name']:<16} {r['distribution'] or '?':<24} {r['version'] or '?':<10} {mark}"
        )
    for n in missing:
        click.secho(f"{n:<16} {'(not installed)':<24} {'':<10} named by the policy", fg="red")
    if missing:
        sys.exit(EXIT_PLUGIN)


# -- serve ---------------------------------------------------------------------


@cli.command("serve")
@click.option(
    "--policy",
    "policy_file",
    envvar="VEIL_POLICY",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Signed policy file (its signature is POLICY.sig). Env: VEIL_POLICY.",
)
@click.option(
    "--trusted-key",
    "trusted",
    multiple=True,
    help="Trusted public key file or directory of *.pub (repeatable). "
    "Env: VEIL_TRUSTED_KEYS (separated by the path separator).",
)
@click.option(
    "--audience",
    envvar="VEIL_AUDIENCE",
    required=True,
    help="The environment this gateway serves; policies for others are refused. "
    "Env: VEIL_AUDIENCE.",
)
@click.option(
    "--state-dir",
    envvar="VEIL_STATE_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.path.join(os.path.expanduser("~"), ".local", "state", "veil"),
    show_default="~/.local/state/veil",
    help="Where the highest accepted policy version is kept (rollback protection).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Worker processes (one core each).",
)
@click.option(
    "--server",
    type=click.Choice(["uvicorn", "granian"]),
    default="uvicorn",
    show_default=True,
    help="ASGI server (granian must be installed).",
)
@click.option(
    "--watch-interval",
    default=1.0,
    show_default=True,
    type=float,
    help="Seconds between checks of the policy file for changes (0: off; SIGHUP reloads).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option("--access-log", is_flag=True, help="Log every request line (off: it costs CPU).")
@click.option(
    "--gc-tuning/--no-gc-tuning",
    default=True,
    show_default=True,
    envvar="VEIL_GC_TUNING",
    help="Once the policy is loaded, freeze the start-up heap out of the garbage "
    "collector and collect young objects less often (about 13% less CPU per call).",
)
def serve(
    policy_file: Path,
    trusted: tuple[str, ...],
    audience: str,
    state_dir: Path,
    host: str,
    port: int,
    workers: int,
    server: str,
    watch_interval: float,
    log_level: str,
    access_log: bool,
    gc_tuning: bool,
) -> None:
    """Serve the gateway with a signed policy.

    The policy is verified before anything listens: an unsigned, tampered,
    expired, not-yet-valid, wrong-audience or rolled-back policy stops here
    with exit code 3; a missing or broken plugin with exit code 4; a plugin
    that cannot start (a missing key, an unreachable store) with exit code 5.
    """
    from .gateway import GatewayConfig
    from .logs import configure_logging
    from .metrics import Metrics
    from .policy import RollbackGuard, TrustedKeys, load_policy
    from .runtime import Runtime

    configure_logging(log_level)
    keys = list(trusted) or [
        p for p in os.environ.get("VEIL_TRUSTED_KEYS", "").split(os.pathsep) if p
    ]
    if not keys:
        _fail("no trusted key: pass --trusted-key PUB (or set VEIL_TRUSTED_KEYS)", 2)
    try:
        p = load_policy(
            policy_file,
            TrustedKeys.from_paths(keys),
            audience=audience,
            guard=RollbackGuard(state_dir),
        )
        Runtime.build(p, Metrics())  # imports and checks every named plugin
    except PolicyError as e:
        _fail(f"policy refused: {e}", EXIT_POLICY)
    except PluginError as e:
        _fail(str(e), EXIT_PLUGIN)
    env = {
        "VEIL_POLICY": str(policy_file),
        "VEIL_TRUSTED_KEYS": os.pathsep.join(keys),
        "VEIL_AUDIENCE": audience,
        "VEIL_STATE_DIR": str(state_dir),
        "VEIL_WATCH_INTERVAL": str(watch_interval),
        "VEIL_GC_TUNING": "1" if gc_tuning else "0",
    }
    os.environ.update(env)
    config = GatewayConfig.from_env(env)
    if server == "granian":
        try:
            from granian import Granian
            from granian.constants import Interfaces
        except ImportError:
            _fail("granian is not installed: `pip install granian`, or use --server uvicorn", 2)
        Granian(
            "veil.app:app_from_env",
            address=host,
            port=port,
            workers=workers,
            interface=Interfaces.ASGI,
            factory=True,
        ).serve()
        return
    import uvicorn

    if workers == 1:
        from .app import create_app

        target: Any = create_app(config)
        factory = False
    else:
        target, factory = "veil.app:app_from_env", True
    try:
        uvicorn.run(
            target,
            factory=factory,
            host=host,
            port=port,
            workers=workers,
            loop="uvloop",
            http="httptools",
            access_log=access_log,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    except SystemExit:
        error = getattr(target.state, "start_error", None) if not factory else None
        if error is None:
            raise
        sys.exit(EXIT_POLICY if isinstance(error, PolicyError) else EXIT_START)


# -- mock upstream -------------------------------------------------------------


@cli.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9000, show_default=True, type=int)
@click.option(
    "--latency-ms",
    default=0.0,
    show_default=True,
    type=float,
    help="Delay before each answer (time to first byte).",
)
@click.option(
    "--chunk-delay-ms",
    default=0.0,
    show_default=True,
    type=float,
    help="Delay between stream chunks.",
)
@click.option(
    "--fail-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of requests answered with --fail-status.",
)
@click.option("--fail-status", default=503, show_default=True, type=int)
@click.option("--seed", type=int, help="Seed for --fail-rate (reproducible failures).")
def mock_upstream(
    host: str,
    port: int,
    latency_ms: float,
    chunk_delay_ms: float,
    fail_rate: float,
    fail_status: int,
    seed: int | None,
) -> None:
    """Serve the deterministic mock model over HTTP (OpenAI-compatible).

    For tests and benchmarks: POST /v1/chat/completions (streaming too),
    POST /v1/embeddings, GET /v1/models, GET /_mock/stats.
    """
    import uvicorn

    from .mock.server import MockSettings, MockUpstream

    app = MockUpstream(MockSettings(latency_ms, chunk_delay_ms, fail_rate, fail_status, seed))
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )


def _load_plugin_commands() -> None:
    """Let installed plugins add subcommands (the CLI, unlike the gateway,
    imports every installed plugin for this; a broken one is reported, not fatal)."""
    import pluggy

    from . import hookspecs
    from .plugins import _entry_points

    pm = pluggy.PluginManager("veil")
    pm.add_hookspecs(hookspecs)
    for ep in _entry_points():
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as e:  # noqa: BLE001 - report and go on
            click.secho(f"warning: plugin {ep.name!r} failed to load: {e}", fg="yellow", err=True)
    pm.hook.veil_register_commands(cli=cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``veil`` command."""
    args = sys.argv[1:] if argv is None else argv
    core = {"policy", "key", "plugins", "serve", "mock-upstream", "--version"}
    if not args or args[0] not in core:
        _load_plugin_commands()
    try:
        cli.main(args=args, prog_name="veil")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
