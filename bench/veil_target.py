"""Everything the harness assumes about the ``veil`` command line, in one place.

The CLI is being written alongside this harness; if its interface changes, adjust the
argument templates below (placeholders in braces are filled with ``str.format``):

* ``veil policy keygen --out DIR``  -> writes DIR/veil-policy.key and DIR/veil-policy.pub
* ``veil policy sign POLICY --key DIR/veil-policy.key``  -> writes POLICY.sig
* ``veil serve --policy P --trusted-key PUB --audience bench --state-dir D
  --host 127.0.0.1 --port PORT``  -> serves POST /v1/chat/completions
* ``veil mock-upstream --port P``  -> OpenAI-compatible mock on 127.0.0.1:P (serves /v1/...)

A subcommand counts as available when ``veil <subcommand> --help`` exits 0.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

from bench.payloads import api_key_sha256

HERE = Path(__file__).resolve().parent
POLICY_TEMPLATE = HERE / "policy.toml.tmpl"
AUDIENCE = "bench"

KEYGEN_ARGS = ["policy", "keygen", "--out", "{key_dir}"]
KEY_NAME = "veil-policy.key"
PUB_NAME = "veil-policy.pub"
SIGN_ARGS = ["policy", "sign", "{policy}", "--key", "{key}"]
SERVE_ARGS = [
    "serve",
    "--policy",
    "{policy}",
    "--trusted-key",
    "{pub}",
    "--audience",
    AUDIENCE,
    "--state-dir",
    "{state_dir}",
    "--host",
    "127.0.0.1",
    "--port",
    "{port}",
]
MOCK_ARGS = ["mock-upstream", "--port", "{port}"]


class VeilSetupError(RuntimeError):
    """A veil setup command (keygen, sign) failed."""


def default_veil_bin() -> Path:
    """``veil`` next to the running interpreter (i.e. in the venv's bin/)."""
    return Path(sys.executable).parent / "veil"


def fill(template: list[str], **values: object) -> list[str]:
    """Fill ``{name}`` placeholders of an argument template."""
    return [arg.format(**values) for arg in template]


def supports(veil: Path, *subcommand: str) -> tuple[bool, str]:
    """Whether ``veil <subcommand> --help`` works; with a reason when it does not."""
    if not veil.exists():
        return False, f"{veil} does not exist (is the veil package installed in the venv?)"
    try:
        proc = subprocess.run(
            [str(veil), *subcommand, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"`veil {' '.join(subcommand)} --help` failed: {err}"
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return False, (
            f"`veil {' '.join(subcommand)} --help` exited {proc.returncode}: {detail[0][:200]}"
        )
    return True, ""


@dataclass
class VeilFiles:
    """Files prepared for ``veil serve``."""

    policy: Path
    pub: Path
    state_dir: Path


def _run(veil: Path, args: list[str], what: str) -> None:
    try:
        proc = subprocess.run(
            [str(veil), *args], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise VeilSetupError(f"{what}: {err}") from err
    if proc.returncode != 0:
        raise VeilSetupError(
            f"{what}: `veil {' '.join(args)}` exited {proc.returncode}:\n"
            f"{(proc.stderr or proc.stdout).strip()[-1500:]}"
        )


def prepare(veil: Path, workdir: Path, mock_base_url: str) -> VeilFiles:
    """Generate a signing key, write the bench policy from the template and sign it."""
    key_dir = workdir / "keys"
    state_dir = workdir / "state"
    key_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    _run(veil, fill(KEYGEN_ARGS, key_dir=key_dir), "policy keygen")
    key, pub = key_dir / KEY_NAME, key_dir / PUB_NAME
    for path in (key, pub):
        if not path.exists():
            raise VeilSetupError(f"policy keygen did not write {path}")
    policy = workdir / "policy.toml"
    policy.write_text(render_policy(mock_base_url))
    _run(veil, fill(SIGN_ARGS, policy=policy, key=key), "policy sign")
    sig = policy.with_name(policy.name + ".sig")
    if not sig.exists():
        raise VeilSetupError(f"policy sign did not write {sig}")
    return VeilFiles(policy=policy, pub=pub, state_dir=state_dir)


def render_policy(mock_base_url: str) -> str:
    """The bench policy with the API key hash and the mock's ``/v1`` base filled in."""
    return Template(POLICY_TEMPLATE.read_text()).substitute(
        key_sha256=api_key_sha256(), api_base=mock_base_url.rstrip("/") + "/v1"
    )


def serve_command(
    veil: Path, files: VeilFiles, port: int, extra: list[str] | None = None
) -> list[str]:
    """``veil serve ...`` for the bench, plus any ``--veil-arg`` extras."""
    return [
        str(veil),
        *fill(SERVE_ARGS, policy=files.policy, pub=files.pub, state_dir=files.state_dir, port=port),
        *(extra or []),
    ]


def mock_command(veil: Path, port: int) -> list[str]:
    """``veil mock-upstream --port P``."""
    return [str(veil), *fill(MOCK_ARGS, port=port)]
