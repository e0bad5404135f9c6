"""Plugins come from the entry-point group `veil`, and only when the policy
names them. Uses a throwaway distribution on sys.path (a .dist-info folder),
in a subprocess so the test's own interpreter stays clean."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from veil.testing import policy_toml


def _fake_distribution(root: Path, name: str, module_source: str, version: str = "1.2.3") -> None:
    pkg = f"veil_{name}"
    (root / f"{pkg}.py").write_text(textwrap.dedent(module_source))
    info = root / f"veil_{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: veil-{name}\nVersion: {version}\n"
    )
    (info / "entry_points.txt").write_text(f"[veil]\n{name} = {pkg}\n")


def _build(root: Path, policy: str) -> subprocess.CompletedProcess[str]:
    (root / "p.toml").write_text(policy)
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from veil.errors import PluginError
        from veil.metrics import Metrics
        from veil.policy import parse_policy
        from veil.runtime import Runtime
        try:
            Runtime.build(parse_policy(Path(sys.argv[1]).read_bytes()), Metrics())
        except PluginError as e:
            print("PluginError:", e)
        print("imported:", sorted(m for m in sys.modules if m.startswith("veil_")))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", code, str(root / "p.toml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    _fake_distribution(tmp_path, "bomb", "raise RuntimeError('imported, but nobody asked')\n")
    _fake_distribution(
        tmp_path,
        "hello",
        """
        from veil import hookimpl

        class Stage:
            name = "hello"

            async def on_request(self, call):
                pass

        @hookimpl
        def veil_register_stages(register):
            register(Stage())
        """,
    )
    return tmp_path


def test_unnamed_installed_plugins_are_never_imported(site: Path) -> None:
    out = _build(site, policy_toml(pipeline=["hello"])).stdout
    assert "PluginError" not in out
    assert "imported: ['veil_hello']" in out


def test_a_broken_named_plugin_stops_start_up_naming_it(site: Path) -> None:
    out = _build(site, policy_toml(pipeline=["hello", "bomb"])).stdout
    assert "PluginError: plugin 'bomb' failed to import (RuntimeError" in out


def test_distribution_and_version_are_checked_before_import(site: Path) -> None:
    wrong_dist = policy_toml(pipeline=["bomb"], plugins={"bomb": {"distribution": "veil-other"}})
    out = _build(site, wrong_dist).stdout
    assert "'bomb' is named by the policy but not installed from distribution 'veil-other'" in out
    assert "veil_bomb" not in out.split("imported:")[1]
    wrong_version = policy_toml(pipeline=["bomb"], plugins={"bomb": {"version": ">=2"}})
    out = _build(site, wrong_version).stdout
    assert "plugin 'bomb' version 1.2.3 is installed, but the policy requires >=2" in out
    assert "veil_bomb" not in out.split("imported:")[1]
