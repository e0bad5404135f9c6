"""Every module of veil_routing declares a sorted, complete ``__all__`` and
imports only ``veil``'s public modules (never another plugin)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import veil_routing

PACKAGE = Path(veil_routing.__file__).parent
OWN = sorted(
    "veil_routing." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
    for p in PACKAGE.glob("*.py")
    if p.name != "__init__.py"
)


@pytest.mark.parametrize("name", ["veil_routing", *OWN])
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    names = getattr(module, "__all__", None)
    assert names is not None, f"{name} declares no __all__"
    assert list(names) == sorted(names)
    for n in names:
        assert hasattr(module, n), f"{name}.__all__ lists missing {n}"


def test_imports_no_other_plugin() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                top = node.module.split(".")[0]
                if top.startswith("veil_") and top != "veil_routing":
                    offenders.append(f"{path.name}: {node.module}")
    assert offenders == []
