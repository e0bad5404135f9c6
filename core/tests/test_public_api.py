"""The public surface: sorted ``__all__``, and imports flow one way."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import veil

CORE = Path(veil.__file__).parent
MODULES = sorted(
    "veil." + ".".join(p.relative_to(CORE).with_suffix("").parts)
    for p in CORE.rglob("*.py")
    if p.name not in ("__init__.py", "__main__.py")
)


@pytest.mark.parametrize("name", ["veil", *MODULES])
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    names = getattr(module, "__all__", None)
    assert names is not None, f"{name} declares no __all__"
    assert list(names) == sorted(names)
    for n in names:
        assert hasattr(module, n), f"{name}.__all__ lists missing {n}"


def test_the_core_never_imports_a_plugin() -> None:
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0].startswith("veil_")]
    assert offenders == []
