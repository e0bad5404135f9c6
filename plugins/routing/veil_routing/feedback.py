"""Online feedback: per-(prompt cluster, model) quality estimates in SQLite.

The stage calls :meth:`FeedbackStore.remember` with what it chose for a
request; ``POST /v1/feedback`` calls :meth:`FeedbackStore.feedback` with the
request id and a score; failed and slow upstream calls are reported with
:meth:`FeedbackStore.observe`. :meth:`FeedbackStore.adjust` then blends the
router's predictions with what was observed: for a model with ``n`` scores
summing to ``s`` in the prompt's cluster, ``(w * predicted + s) / (w + n)``
with ``w = prior_weight`` (the prediction counts like ``w`` observations),
times ``1 - error rate`` (errors / (calls + w)). Everything persists in one
SQLite file (WAL) under the directory given, so estimates survive restarts.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from pathlib import Path

__all__ = ["DB_NAME", "FeedbackStore"]

DB_NAME = "routing-feedback.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS choices (
    request_id TEXT PRIMARY KEY, cluster INTEGER NOT NULL, model TEXT NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS choices_at ON choices (at);
CREATE TABLE IF NOT EXISTS stats (
    cluster INTEGER NOT NULL, model TEXT NOT NULL,
    scores REAL NOT NULL DEFAULT 0, score_sum REAL NOT NULL DEFAULT 0,
    calls REAL NOT NULL DEFAULT 0, errors REAL NOT NULL DEFAULT 0,
    latency_s REAL,
    PRIMARY KEY (cluster, model)
);
"""


class _Stat:
    __slots__ = ("calls", "errors", "latency_s", "score_sum", "scores")

    def __init__(self) -> None:
        self.scores = 0.0
        self.score_sum = 0.0
        self.calls = 0.0
        self.errors = 0.0
        self.latency_s: float | None = None


class FeedbackStore:
    """Online per-(cluster, model) quality estimates, persisted in SQLite (WAL)
    under a directory; survives restarts. Thread-safe; cheap calls (reads come
    from memory, each write is one small transaction)."""

    def __init__(
        self,
        path: Path,
        *,
        prior_weight: float = 5.0,
        ttl_s: float = 24 * 3600.0,
        max_pending: int = 100_000,
        latency_alpha: float = 0.2,
    ) -> None:
        """Open (creating if needed) the store in directory ``path``.

        :param prior_weight: how many observations the router's prediction is worth.
        :param ttl_s: how long a remembered choice waits for feedback.
        :param max_pending: at most this many remembered choices are kept (oldest dropped).
        :param latency_alpha: weight of a new latency in the moving average.
        """
        if not prior_weight > 0:
            raise ValueError("prior_weight must be > 0")
        self.prior_weight = float(prior_weight)
        self.ttl_s = float(ttl_s)
        self.max_pending = int(max_pending)
        self.latency_alpha = float(latency_alpha)
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            directory / DB_NAME, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._stats: dict[tuple[int, str], _Stat] = {}
        for cluster, model, scores, score_sum, calls, errors, latency in self._db.execute(
            "SELECT cluster, model, scores, score_sum, calls, errors, latency_s FROM stats"
        ):
            st = _Stat()
            st.scores, st.score_sum, st.calls, st.errors = scores, score_sum, calls, errors
            st.latency_s = latency
            self._stats[(int(cluster), str(model))] = st
        self._writes = 0
        self._closed = False

    # ------------------------------------------------------------ writes
    def remember(self, request_id: str, cluster: int, model: str) -> None:
        """Record what the stage chose for ``request_id`` so feedback can find it."""
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO choices (request_id, cluster, model, at) "
                "VALUES (?, ?, ?, ?)",
                (request_id, int(cluster), model, now),
            )
            self._writes += 1
            if self._writes % 1000 == 0:
                self._prune(now)

    def _prune(self, now: float) -> None:
        self._db.execute("DELETE FROM choices WHERE at < ?", (now - self.ttl_s,))
        self._db.execute(
            "DELETE FROM choices WHERE request_id IN (SELECT request_id FROM choices "
            "ORDER BY at DESC LIMIT -1 OFFSET ?)",
            (self.max_pending,),
        )

    def feedback(self, request_id: str, score: float) -> bool:
        """Apply a 0..1 score to the model chosen for ``request_id``. Returns
        False when the id is unknown, expired or already scored. Raises
        ValueError for a score outside 0..1."""
        if isinstance(score, bool) or not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise ValueError("score must be a number between 0 and 1")
        with self._lock:
            row = self._db.execute(
                "SELECT cluster, model, at FROM choices WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is None:
                return False
            cluster, model, at = int(row[0]), str(row[1]), float(row[2])
            self._db.execute("BEGIN")
            try:
                self._db.execute("DELETE FROM choices WHERE request_id = ?", (request_id,))
                if time.time() - at > self.ttl_s:
                    self._db.execute("COMMIT")
                    return False
                st = self._stats.setdefault((cluster, model), _Stat())
                st.scores += 1
                st.score_sum += float(score)
                self._save(cluster, model, st)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return True

    def observe(self, model: str, cluster: int, *, error: bool, latency_s: float | None) -> None:
        """Count one upstream call of ``model`` for a prompt in ``cluster``:
        whether it failed (429, 5xx, timeout, connect error) and its latency."""
        with self._lock:
            st = self._stats.setdefault((int(cluster), model), _Stat())
            st.calls += 1
            st.errors += 1 if error else 0
            if latency_s is not None and math.isfinite(latency_s) and latency_s >= 0:
                st.latency_s = (
                    latency_s
                    if st.latency_s is None
                    else (1 - self.latency_alpha) * st.latency_s + self.latency_alpha * latency_s
                )
            self._save(int(cluster), model, st)

    def _save(self, cluster: int, model: str, st: _Stat) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO stats "
            "(cluster, model, scores, score_sum, calls, errors, latency_s) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (cluster, model, st.scores, st.score_sum, st.calls, st.errors, st.latency_s),
        )

    # ------------------------------------------------------------ reads
    def adjust(self, cluster: int, predicted: dict[str, float]) -> dict[str, float]:
        """Blend predictions with what feedback and errors showed (prior
        weighted like prior_weight observations). Models without observations
        keep their prediction."""
        w = self.prior_weight
        out: dict[str, float] = {}
        with self._lock:
            for model, p in predicted.items():
                st = self._stats.get((int(cluster), model))
                if st is None:
                    out[model] = p
                    continue
                q = (w * p + st.score_sum) / (w + st.scores)
                out[model] = q * (1.0 - st.errors / (st.calls + w))
        return out

    def estimates(self) -> list[dict[str, object]]:
        """Every (cluster, model) with its counts, for admin views and tests."""
        with self._lock:
            return [
                {
                    "cluster": c,
                    "model": m,
                    "scores": st.scores,
                    "mean_score": st.score_sum / st.scores if st.scores else None,
                    "calls": st.calls,
                    "errors": st.errors,
                    "latency_s": st.latency_s,
                }
                for (c, m), st in sorted(self._stats.items())
            ]

    def close(self) -> None:
        """Flush and close the database (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
