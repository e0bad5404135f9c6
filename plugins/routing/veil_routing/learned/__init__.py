"""The learned router: predicts each pool model's quality on a prompt.

Train with :func:`train` (or ``veil route train``), save with
:meth:`QualityRouter.save`, pin the printed SHA-256 in the policy, and load
with :func:`load`, which refuses a file whose SHA-256 differs.
"""

from __future__ import annotations

from .artifact import file_sha256
from .errors import ArtifactError, DataError
from .router import QualityRouter, load
from .training import train

__all__ = ["ArtifactError", "DataError", "QualityRouter", "file_sha256", "load", "train"]
