"""``veil route`` is registered by the plugin: the ML branch's ``train`` and
``eval`` when ``veil_routing.route_cli`` is installed, else a clear error."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def _veil(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "veil", *args], capture_output=True, text=True, timeout=120
    )


def test_veil_route_is_registered() -> None:
    result = _veil("--help")
    assert result.returncode == 0
    assert "route" in result.stdout


def test_veil_route_says_what_is_missing_or_offers_train_and_eval() -> None:
    if importlib.util.find_spec("veil_routing.route_cli") is None:
        result = _veil("route")
        assert result.returncode == 1
        assert "veil_routing.route_cli" in result.stderr
        assert "Traceback" not in result.stderr
    else:
        result = _veil("route", "--help")
        assert result.returncode == 0
        assert "train" in result.stdout and "eval" in result.stdout
