"""Shared fixtures of the learned-router tests (vendored data paths, import path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"
PAIRS = DATA / "routellm_pairs.small.jsonl"
POOL = DATA / "routerbench11.small.jsonl"
PRICES = DATA / "prices.json"

# Until plugins/routing/pyproject.toml is installed (it comes from the stage
# branch), import veil_routing from the source tree.
if importlib.util.find_spec("veil_routing") is None:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
