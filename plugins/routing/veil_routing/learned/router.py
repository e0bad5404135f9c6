"""QualityRouter: predicts, per pool model, how well it will answer a prompt.

One logistic model per pool model over TF-IDF-weighted hashed word features
(see ``_features``), a ridge model per model of the answer's length in tokens,
and k-means centres over the predicted-quality vectors that name a prompt's
cluster for online feedback. Inference is numpy on a few hundred sparse
features: no network, no threads, read-only state (thread-safe).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import artifact
from ._features import hashed_ids
from .errors import ArtifactError

F32 = npt.NDArray[np.float32]
DEFAULT_OUTPUT_TOKENS = 256


class QualityRouter:
    """A trained router. Build one with :func:`veil_routing.learned.train` or
    :func:`veil_routing.learned.load`; all methods are thread-safe."""

    def __init__(
        self,
        *,
        models: list[str],
        n_bits: int,
        feature_ids: npt.NDArray[np.uint32],
        idf: F32,
        coef: F32,
        intercept: F32,
        length_models: list[str],
        length_coef: F32,
        length_intercept: F32,
        default_tokens: int,
        centers: F32,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.models: list[str] = list(models)
        self.n_bits = n_bits
        self._ids = np.asarray(feature_ids, dtype=np.uint32)
        self._idf = np.asarray(idf, dtype=np.float32)
        self._coef = np.asarray(coef, dtype=np.float32)
        self._intercept = np.asarray(intercept, dtype=np.float32)
        self.length_models: list[str] = list(length_models)
        self._len_coef = np.asarray(length_coef, dtype=np.float32)
        self._len_intercept = np.asarray(length_intercept, dtype=np.float32)
        self.default_tokens = int(default_tokens)
        self._centers = np.asarray(centers, dtype=np.float32)
        self.meta: dict[str, Any] = dict(meta or {})
        self.sha256: str | None = None
        self._check()
        # predict, cluster and predict_output_tokens of one prompt share one analysis
        self._analysis = functools.lru_cache(maxsize=32)(self._analyse)

    def _check(self) -> None:
        n_f, n_m, n_l = len(self._ids), len(self.models), len(self.length_models)
        ok = (
            n_m > 0
            and len(set(self.models)) == n_m
            and 1 <= self.n_bits <= 30
            and self._idf.shape == (n_f,)
            and self._coef.shape == (n_f, n_m)
            and self._intercept.shape == (n_m,)
            and self._len_coef.shape == (n_f, n_l)
            and self._len_intercept.shape == (n_l,)
            and self._centers.ndim == 2
            and self._centers.shape[0] >= 1
            and self._centers.shape[1] == n_m
            and bool(np.all(np.diff(self._ids.astype(np.int64)) > 0))
        )
        if not ok:
            raise ArtifactError("router arrays have inconsistent shapes: retrain the artifact")

    @property
    def n_clusters(self) -> int:
        """How many prompt clusters :meth:`cluster` can return."""
        return int(self._centers.shape[0])

    def features(self, prompt: str) -> tuple[npt.NDArray[np.intp], F32]:
        """Row indices into the weight tables and their L2-normalised TF-IDF values."""
        ids = hashed_ids(prompt, self.n_bits)
        keys, counts = np.unique(np.asarray(ids, dtype=np.uint32), return_counts=True)
        tf = counts.astype(np.float32)
        pos = np.searchsorted(self._ids, keys)
        pos[pos >= len(self._ids)] = 0
        known = self._ids[pos] == keys if len(self._ids) else np.zeros(len(keys), bool)
        pos = pos[known]
        x = (1.0 + np.log(tf[known])) * self._idf[pos]
        norm = float(np.sqrt(x @ x))
        if norm > 0:
            x /= norm
        return pos, x.astype(np.float32, copy=False)

    def _analyse(self, prompt: str) -> tuple[npt.NDArray[np.intp], F32, F32]:
        pos, x = self.features(prompt)
        probs: F32 = 1.0 / (1.0 + np.exp(-(x @ self._coef[pos] + self._intercept)))
        for a in (pos, x, probs):
            a.setflags(write=False)  # shared through the cache
        return pos, x, probs

    def predict(self, prompt: str) -> dict[str, float]:
        """Predicted quality in 0..1 (probability of a correct or good answer)
        for every model in :attr:`models`."""
        p = self._analysis(prompt)[2]
        return {m: float(v) for m, v in zip(self.models, p, strict=True)}

    def predict_many(self, prompts: list[str]) -> npt.NDArray[np.float64]:
        """Predicted quality for many prompts: an array (len(prompts), len(models))."""
        out = np.empty((len(prompts), len(self.models)))
        for i, p in enumerate(prompts):
            out[i] = self._analyse(p)[2]
        return out

    def predict_output_tokens(self, prompt: str) -> dict[str, int]:
        """Predicted answer length in tokens per model. Models the training rows
        had no ``tokens`` for get the median length seen in training (or 256)."""
        out = dict.fromkeys(self.models, self.default_tokens)
        if self.length_models:
            pos, x, _ = self._analysis(prompt)
            log_len = x @ self._len_coef[pos] + self._len_intercept
            for m, v in zip(self.length_models, log_len, strict=True):
                out[m] = max(1, round(math.expm1(min(float(v), 12.0))))
        return out

    def cluster(self, prompt: str) -> int:
        """The prompt's cluster id, 0..n_clusters-1: the nearest k-means centre
        to its predicted-quality vector."""
        p = self._analysis(prompt)[2]
        return int(np.argmin(((self._centers - p) ** 2).sum(axis=1)))

    def save(self, path: str | Path) -> str:
        """Write the artifact atomically; return the file's SHA-256 (to pin in the policy)."""
        meta = dict(self.meta)
        meta.update(
            models=self.models,
            n_bits=self.n_bits,
            length_models=self.length_models,
            default_tokens=self.default_tokens,
        )
        data = artifact.encode(
            meta,
            {
                "feature_ids": self._ids,
                "idf": self._idf.astype(np.float16),
                "coef": self._coef.astype(np.float16),
                "intercept": self._intercept.astype(np.float32),
                "length_coef": self._len_coef.astype(np.float16),
                "length_intercept": self._len_intercept.astype(np.float32),
                "centers": self._centers.astype(np.float32),
            },
        )
        self.sha256 = artifact.write(path, data)
        return self.sha256


def load(path: str | Path, sha256: str | None) -> QualityRouter:
    """Load an artifact; refuse (:class:`ArtifactError`) when ``sha256`` is given
    and differs from the file's. No network; milliseconds for a few MB."""
    meta, arrays, digest = artifact.read(path, sha256)
    try:
        router = QualityRouter(
            models=[str(m) for m in meta["models"]],
            n_bits=int(meta["n_bits"]),
            feature_ids=arrays["feature_ids"],
            idf=arrays["idf"],
            coef=arrays["coef"],
            intercept=arrays["intercept"],
            length_models=[str(m) for m in meta["length_models"]],
            length_coef=arrays["length_coef"],
            length_intercept=arrays["length_intercept"],
            default_tokens=int(meta["default_tokens"]),
            centers=arrays["centers"],
            meta=meta,
        )
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(
            f"{path} is a damaged router artifact: retrain it with `veil route train`"
        ) from None
    router.sha256 = digest
    return router
