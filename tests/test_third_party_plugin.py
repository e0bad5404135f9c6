"""A plugin from outside the repository works through the entry-point path.

``examples/veil-wordguard`` is installed into the running environment as a
real distribution (``pip install``, not editable, not a ``plugins=`` mapping),
then found by ``veil plugins``, loaded by ``veil serve`` because the signed
policy names it, version-checked, reported by ``GET /-/plugins``, and never
imported when the policy does not name it.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import openai
import pytest

from veil.cli import EXIT_PLUGIN
from veil.testing import ADMIN_KEY, TEST_KEY, GatewayProcess, PolicyKit, policy_toml

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "examples" / "veil-wordguard"
PACKAGE = "veil_wordguard"
META = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
DIST, VERSION = META["name"], META["version"]
BLOCKED = ["pineapple"]


# -- installing the example, once per session --------------------------------------


@dataclass(frozen=True)
class Installed:
    """How the example came to be installed: ``already`` (an identical copy,
    or an editable install of this source tree, was there), ``pip`` (built
    by its own build backend) or ``wheel`` (the backend was unreachable
    offline: a wheel assembled here from the same files)."""

    how: str


def _source_files() -> dict[str, bytes]:
    """The package's files as a wheel installs them (path relative to site-packages)."""
    return {
        f"{PACKAGE}/{p.relative_to(PROJECT / PACKAGE).as_posix()}": p.read_bytes()
        for p in sorted((PROJECT / PACKAGE).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _installed_matches() -> bool:
    """True when the installed distribution is this source tree: same version
    and entry point, and either an editable install of this directory or a
    copy whose package files are byte-identical."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == "veil"}
    if dist.version != VERSION or eps != {"wordguard": PACKAGE}:
        return False
    direct = dist.read_text("direct_url.json")
    if direct:
        info = json.loads(direct)
        if info.get("dir_info", {}).get("editable"):
            where = Path(unquote(urlparse(info.get("url", "")).path))
            return where.resolve() == PROJECT.resolve()
    files = {str(f) for f in dist.files or ()}
    for rel, data in _source_files().items():
        if rel not in files:
            return False
        path = Path(str(dist.locate_file(rel)))
        if not path.is_file() or path.read_bytes() != data:
            return False
    return True


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def _assemble_wheel(out: Path) -> Path:
    """A PEP 427 wheel of the example from its pyproject metadata, for when
    pip cannot get the build backend (no network and no hatchling here)."""
    name = DIST.replace("-", "_")
    info = f"{name}-{VERSION}.dist-info"
    requires = "".join(f"Requires-Dist: {d}\n" for d in META.get("dependencies", []))
    entry_points = "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
        for group, eps in META.get("entry-points", {}).items()
    )
    files = {
        **_source_files(),
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n"
            f"Requires-Python: {META.get('requires-python', '')}\n{requires}"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: veil-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{info}/entry_points.txt": entry_points.encode(),
    }
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for rel, data in files.items():
        writer.writerow([rel, _record_hash(data), len(data)])
    writer.writerow([f"{info}/RECORD", "", ""])
    wheel = out / f"{name}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, data in files.items():
            z.writestr(rel, data)
        z.writestr(f"{info}/RECORD", record.getvalue())
    return wheel


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Serialize installs of concurrent test runs sharing this environment."""
    import fcntl

    lock = Path(tempfile.gettempdir()) / "veil-wordguard-install.lock"
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def installed() -> Installed:
    """``examples/veil-wordguard``, installed (non-editable) into this
    environment; a no-op when an identical copy is already there."""
    with _install_lock():
        if _installed_matches():
            return Installed("already")
        args = ["--no-deps", "--force-reinstall", "--quiet"]
        if importlib.util.find_spec("hatchling") is not None:
            args.append("--no-build-isolation")  # the backend is here: no download
        built = _pip(*args, str(PROJECT))
        how = "pip"
        if built.returncode != 0:
            with tempfile.TemporaryDirectory() as tmp:
                wheel = _assemble_wheel(Path(tmp))
                fallback = _pip("--no-deps", "--no-index", "--force-reinstall", "-q", str(wheel))
            if fallback.returncode != 0:
                pytest.fail(
                    f"cannot install {DIST}:\n{built.stdout}{built.stderr}\n"
                    f"{fallback.stdout}{fallback.stderr}"
                )
            how = "wheel"
        importlib.invalidate_caches()
        assert _installed_matches(), f"{DIST} was installed ({how}) but does not match the source"
        return Installed(how)


# -- helpers ---------------------------------------------------------------------------


def _policy(**plugin_entry: str) -> str:
    return policy_toml(
        pipeline=["wordguard"],
        plugins={"wordguard": {"distribution": DIST, **plugin_entry}},
        sections={"wordguard": {"blocked": BLOCKED}},
    )


def _veil(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "veil", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def served(
    installed: Installed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """``veil serve`` in a subprocess with a signed policy naming wordguard."""
    kit = PolicyKit(tmp_path_factory.mktemp("wordguard-served"))
    path = kit.write(_policy(version=">=0.1,<0.2"))
    with GatewayProcess(path, kit.public_key_path, state_dir=kit.state_dir) as gw:
        yield gw


@pytest.fixture
def client(served: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.url + "/v1", api_key=TEST_KEY, max_retries=0) as c:
        yield c


# -- the tests -------------------------------------------------------------------------


def test_veil_plugins_lists_the_installed_plugin(installed: Installed, tmp_path: Path) -> None:
    result = _veil("plugins", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["plugins"]}
    assert rows["wordguard"] == {
        "name": "wordguard",
        "distribution": DIST,
        "version": VERSION,
        "active": False,
        "position": None,
    }


def test_veil_plugins_marks_it_active_for_a_policy_naming_it(
    installed: Installed, policy_kit: PolicyKit
) -> None:
    path = policy_kit.write(_policy())
    result = _veil("plugins", "--json", "--policy", str(path), cwd=policy_kit.root)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    wordguard = next(r for r in data["plugins"] if r["name"] == "wordguard")
    assert wordguard["active"] is True and wordguard["position"] == 0
    assert data["missing"] == []


def test_served_gateway_refuses_a_blocked_word(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "More PINEAPPLE"}]
        )
    assert e.value.status_code == 400 and e.value.code == "blocked_word"
    assert "pineapple" not in e.value.response.text.lower()


def test_served_gateway_passes_a_clean_call_with_the_header(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="mock-model", messages=[{"role": "user", "content": "More apples"}]
    )
    assert raw.headers["x-wordguard"] == "checked"
    assert "apples" in (raw.parse().choices[0].message.content or "")


def test_served_gateway_streams_through_the_plugin(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="mock-model", messages=[{"role": "user", "content": "More apples"}], stream=True
    )
    assert raw.headers["x-wordguard"] == "checked"
    assert "apples" in "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "pineapple"}], stream=True
        )
    assert e.value.code == "blocked_word"


def test_admin_plugins_route_lists_it_as_active(served: GatewayProcess) -> None:
    r = httpx.get(
        served.url + "/-/plugins", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    )
    assert r.status_code == 200, r.text
    rows = {row["name"]: row for row in r.json()["data"]}
    assert rows["wordguard"] == {
        "name": "wordguard",
        "distribution": DIST,
        "version": VERSION,
        "active": True,
        "position": 0,
    }
    denied = httpx.get(
        served.url + "/-/plugins", headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=10
    )
    assert denied.status_code == 403


def test_policy_requiring_another_version_stops_serve_with_exit_code_4(
    installed: Installed, policy_kit: PolicyKit
) -> None:
    path = policy_kit.write(_policy(version=">=9"))
    gw = GatewayProcess(path, policy_kit.public_key_path, state_dir=policy_kit.state_dir)
    try:
        code = gw.wait(60)
        output = gw.output()
    finally:
        gw.stop()
    assert code == EXIT_PLUGIN == 4, output
    assert "'wordguard' version 0.1.0 is installed, but the policy requires >=9" in output


def test_policy_naming_another_distribution_stops_serve_with_exit_code_4(
    installed: Installed, policy_kit: PolicyKit
) -> None:
    path = policy_kit.write(_policy(distribution="veil-wordguard-fork"))
    gw = GatewayProcess(path, policy_kit.public_key_path, state_dir=policy_kit.state_dir)
    try:
        code = gw.wait(60)
        output = gw.output()
    finally:
        gw.stop()
    assert code == EXIT_PLUGIN, output
    assert "'wordguard' is named by the policy but not installed" in output


PROBE = """
import json, sys
from pathlib import Path
from veil.metrics import Metrics
from veil.plugins import installed_plugins
from veil.policy import TrustedKeys, load_policy
from veil.runtime import Runtime

policy = load_policy(Path(sys.argv[1]), TrustedKeys.from_paths([sys.argv[2]]), audience="test")
runtime = Runtime.build(policy, Metrics())
listed = [p.name for p in installed_plugins()]  # what veil plugins and /-/plugins read
print(json.dumps({
    "listed": "wordguard" in listed,
    "stages": [s.name for s in runtime.stages],
    "imported": "veil_wordguard" in sys.modules,
}))
"""


@pytest.mark.parametrize(
    ("pipeline", "imported"),
    [([], False), (["wordguard"], True)],
    ids=["policy-without-wordguard", "policy-naming-wordguard"],
)
def test_a_plugin_the_policy_does_not_name_is_never_imported(
    installed: Installed, policy_kit: PolicyKit, pipeline: list[str], imported: bool
) -> None:
    path = policy_kit.write(policy_toml(pipeline=pipeline))
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), str(policy_kit.public_key_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=policy_kit.root,  # no source tree on sys.path: only the installed copy
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "listed": True,
        "stages": pipeline,
        "imported": imported,
    }
