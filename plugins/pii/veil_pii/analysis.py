"""Running detection off the event loop: a bounded pool, a timeout, a cache.

:class:`AnalysisPool` owns one :class:`~veil_pii.detector.Detector` per
worker thread (spaCy pipelines are not shared between threads) and answers
``await pool.analyze(texts)`` with the findings of each text. Three things
keep it cheap and safe:

- *Cache*: findings (offsets and types, never text) are remembered under a
  keyed BLAKE2 digest of the text, so the history a chat client resends
  every turn is analysed once. The key is random per process: the digests
  cannot be matched against guessed values.
- *Bound*: at most ``max_pending`` texts wait or run; beyond that, calls are
  refused at once (503) instead of queueing without limit.
- *Deadline*: the whole analysis of a call must finish within ``timeout_ms``;
  otherwise the call is refused (the worker's result is discarded).

Refusals raise :class:`AnalysisUnavailable`; the stage turns it into a 503
``pii_unavailable`` and never calls the upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .detector import Detector, Finding
from .settings import PiiSettings

__all__ = ["AnalysisPool", "AnalysisUnavailable"]

_POOLS: dict[str, list[Detector]] = {}
_POOLS_LOCK = threading.Lock()


class AnalysisUnavailable(RuntimeError):
    """Analysis could not run for this call: overloaded, too slow, or broken.

    The message says which, and never contains request text."""


def _detection_key(settings: PiiSettings) -> str:
    fields = {"entities", "score_threshold", "language", "spacy_model", "allow_list", "recognizers"}
    return settings.model_dump_json(include=fields)


def _detectors(settings: PiiSettings, count: int) -> list[Detector]:
    """``count`` detectors for these detection settings, built once per
    process and reused across policy reloads that keep the same settings."""
    key = _detection_key(settings)
    with _POOLS_LOCK:
        built = _POOLS.setdefault(key, [])
        while len(built) < count:
            built.append(Detector(settings))
        return built[:count]


class AnalysisPool:
    """Analyses texts in worker threads (see the module doc)."""

    def __init__(self, settings: PiiSettings) -> None:
        self.settings = settings
        self.timeout = settings.timeout_ms / 1000
        self.max_pending = settings.max_pending
        self._detectors = _detectors(settings, settings.workers)
        self._free: list[Detector] = list(self._detectors)
        self._free_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="veil-pii")
        self._cache: OrderedDict[bytes, tuple[Finding, ...]] = OrderedDict()
        self._cache_size = settings.cache_size
        self._key = os.urandom(32)
        self._pending = 0
        self.analysed = 0
        self.cache_hits = 0

    @property
    def detector(self) -> Detector:
        """A detector for synchronous use (tests, the ``veil pii`` commands)."""
        return self._detectors[0]

    def _digest(self, text: str) -> bytes:
        return hashlib.blake2b(
            text.encode("utf-8", "surrogatepass"), key=self._key, digest_size=20
        ).digest()

    def _run(self, texts: Sequence[str]) -> list[list[Finding]]:
        with self._free_lock:
            detector = self._free.pop()
        try:
            return [detector.analyze(text, stop_at_block=True) for text in texts]
        finally:
            with self._free_lock:
                self._free.append(detector)

    async def analyze(self, texts: Sequence[str]) -> list[list[Finding]]:
        """The findings of each text, in order.

        :raises AnalysisUnavailable: too many analyses pending, the deadline
            passed, or the detector failed.
        """
        results: list[list[Finding] | None] = [None] * len(texts)
        missing: dict[bytes, list[int]] = {}
        for i, text in enumerate(texts):
            digest = self._digest(text)
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
                results[i] = list(cached)
                self.cache_hits += 1
            else:
                missing.setdefault(digest, []).append(i)
        if missing:
            await self._analyze_missing(texts, missing, results)
        return [r if r is not None else [] for r in results]

    async def _analyze_missing(
        self,
        texts: Sequence[str],
        missing: dict[bytes, list[int]],
        results: list[list[Finding] | None],
    ) -> None:
        if self._pending + len(missing) > self.max_pending:
            raise AnalysisUnavailable("personal-data analysis is overloaded; retry shortly")
        digests = list(missing)
        todo = [texts[missing[d][0]] for d in digests]
        self._pending += len(todo)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                found = await loop.run_in_executor(self._executor, self._run, todo)
        except TimeoutError:
            raise AnalysisUnavailable(
                f"personal-data analysis did not finish within {self.settings.timeout_ms} ms"
            ) from None
        except Exception as e:
            raise AnalysisUnavailable(
                f"personal-data analysis failed ({type(e).__name__})"
            ) from None
        finally:
            self._pending -= len(todo)
        self.analysed += len(todo)
        for digest, findings in zip(digests, found, strict=True):
            for i in missing[digest]:
                results[i] = list(findings)
            if self._cache_size:
                self._cache[digest] = tuple(findings)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)

    def remember(self, text: str, findings: Sequence[Finding]) -> None:
        """Cache ``findings`` as the analysis of ``text`` without analysing it.

        For answers veil itself restored: their personal values are exactly
        the values it put back, and chat clients resend them as history on
        every later turn.
        """
        if self._cache_size and text:
            digest = self._digest(text)
            self._cache[digest] = tuple(findings)
            self._cache.move_to_end(digest)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def analyze_sync(self, text: str) -> list[Finding]:
        """Analyse one text in the calling thread (no cache, no deadline)."""
        return self.detector.analyze(text)

    def close(self) -> None:
        """Stop the worker threads (running analyses finish first)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
