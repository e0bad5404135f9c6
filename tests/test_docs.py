"""Meta-tests of the plugin author guide, ``docs/plugins.md``.

Every hook in :mod:`veil.hookspecs` has its own section with its exact
signature, and a documented contract; the guide documents no hook that does
not exist; and every code block the guide quotes from a tested file (marked
``<!-- quote: PATH -->``) is still a verbatim excerpt of that file.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from veil import hookspecs

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"


def _hookspecs() -> dict[str, Callable[..., Any]]:
    """The hooks a plugin can implement: ``veil_*`` functions marked as specs."""
    return {
        name: fn
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("veil_") and hasattr(fn, "veil_spec")
    }


HOOKS = _hookspecs()


def signature(fn: Callable[..., Any]) -> str:
    """``name(arg1, arg2)``: how the guide writes a hook's signature."""
    return f"{fn.__name__}({', '.join(inspect.signature(fn).parameters)})"


@dataclass(frozen=True)
class Section:
    level: int
    title: str
    body: str


def _sections(text: str) -> list[Section]:
    """Markdown sections; a section's body runs to the next heading of the
    same or a higher level (fenced code blocks are not headings)."""
    lines = text.splitlines()
    heads: list[tuple[int, int, str]] = []
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) (.+)", line)):
            heads.append((i, len(m.group(1)), m.group(2).strip()))
    out = []
    for n, (i, level, title) in enumerate(heads):
        end = next((j for j, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
        out.append(Section(level, title, "\n".join(lines[i + 1 : end])))
    return out


SECTIONS = _sections(GUIDE.read_text())


def test_hookspecs_are_found() -> None:
    assert {"veil_register_stages", "veil_settings_model", "veil_startup"} <= set(HOOKS)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_has_a_section_with_its_exact_signature(name: str) -> None:
    sig = signature(HOOKS[name])
    own = [s for s in SECTIONS if re.match(rf"`?{name}\b", s.title)]
    assert len(own) == 1, f"docs/plugins.md needs one section titled {sig!r}"
    section = own[0]
    assert section.title.strip("`") == sig, (
        f"the {name} section must be titled with its exact signature {sig!r}"
    )
    assert "```python" in section.body, f"the {name} section needs a minimal example"
    assert "When:" in section.body, f"the {name} section must say when the hook fires"
    for arg in inspect.signature(HOOKS[name]).parameters:
        assert f"`{arg}`" in section.body, f"the {name} section must describe `{arg}`"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_has_a_docstring(name: str) -> None:
    doc = inspect.getdoc(HOOKS[name])
    assert doc and doc.strip(), f"veil.hookspecs.{name} has no docstring: it is the contract"


def test_the_guide_documents_no_hook_that_does_not_exist() -> None:
    titled = {
        m.group(1) for s in SECTIONS if (m := re.match(r"`?(veil_[a-z_]+)\(", s.title)) is not None
    }
    assert titled == set(HOOKS)


QUOTE = re.compile(r"<!-- quote: (?P<path>\S+) -->\n```[a-z]*\n(?P<code>.*?)\n```", re.DOTALL)


def test_quoted_code_is_verbatim_from_the_tested_files() -> None:
    quotes = list(QUOTE.finditer(GUIDE.read_text()))
    assert quotes, "the guide quotes no tested file"
    for q in quotes:
        path = ROOT / q["path"]
        assert path.is_file(), f"docs/plugins.md quotes {q['path']}, which does not exist"
        assert q["code"] in path.read_text(), (
            f"a block quoted from {q['path']} no longer matches the file:\n{q['code']}"
        )


def test_every_module_of_the_example_plugin_is_quoted() -> None:
    quoted = {q["path"] for q in QUOTE.finditer(GUIDE.read_text())}
    package = ROOT / "examples" / "veil-wordguard" / "veil_wordguard"
    for module in sorted(package.glob("*.py")):
        assert module.relative_to(ROOT).as_posix() in quoted, f"{module.name} is not quoted"
