"""Script entry point: ``python bench/run.py [flags]`` (same as ``python -m bench``)."""

from __future__ import annotations

import sys
from pathlib import Path


def _entry() -> int:
    if not __package__:  # run as a file: make the repo root importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(_entry())
