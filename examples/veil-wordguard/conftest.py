"""Make ``veil_wordguard`` importable from this source tree when the tests
run without the distribution installed (e.g. from the repository root).

The gateway fixtures (``policy_kit``, ``start_gateway``, ``mock_upstream``)
come from ``veil.testing``, a pytest plugin that installing ``veil`` enables.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
