"""Cache scenario: the CPU a call costs with the ``cache`` stage, on its miss path and
on its hit path, against the core only.

Run with ``python -m bench.cache`` (``make bench`` runs it after the audit scenario).
Everything is measured in one run, on loopback, in front of one ``veil mock-upstream``:

- ``core``: ``veil serve`` with an empty pipeline (the core only), the baseline, loaded
  with the same never-repeated requests as ``miss``;
- ``miss``: ``veil serve`` with ``pipeline = ["cache"]`` (memory store,
  ``any_temperature = true`` since the bench's request has temperature 0.2), loaded
  with requests that are never repeated (the user message holds a value unique to the
  run, the load generator's thread and the request): every call computes its key,
  looks it up, misses, calls the upstream and stores the answer (streams: rebuilt
  from the text the core collected), and the store evicts as it fills;
- ``hit``: the same gateway loaded with the main bench's request, always the same:
  after the first call, every call is answered from the cache (streams: replayed as
  chunks) and never reaches the upstream.

Before measuring, the ``miss`` gateway must say ``x-veil-cache: miss`` to two new
requests and the ``hit`` gateway ``hit`` to a repeated one, or the run stops (exit 1).
After the load, ``/admin/cache`` of each must show the load went the intended way (no
hit on ``miss``; no more than the warm-up's misses on ``hit``).

Load: wrk with bench/wrk_post.lua (bench/loadgen.py when wrk is missing),
non-streaming and streaming, at 1 and 16 connections (``--connections``), interleaved
as in the other stage scenarios.

Measured: each gateway's CPU ms per request (user+system CPU of its process tree,
divided by the requests served). Judged, as the median over the cells of each
gateway's ratio to core in the same cell:

- ``miss``: at most 1.10 ("the miss path adds at most 10% CPU per request");
- ``hit``: at most 0.99 ("a hit costs less CPU than the core-only gateway's miss
  path": it skips the upstream call).

Exit codes: 0 ran (even if a target failed), 1 setup failed, a server or the load
generator failed, or a load saw errors, 2 usage, 3 with ``--strict`` a target failed,
130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import stage_cpu
from bench.harness import CHAT_PATH
from bench.payloads import API_KEY, chat_body
from bench.stage_cpu import BenchError, Setup, StageScenario, upstream_line

MARKER = "__BENCH_SEQ__"
LIMITS = {"miss": 1.10, "hit": 0.99}


def _post(url: str, body: dict[str, Any]) -> tuple[int, str]:
    r = httpx.post(
        url + CHAT_PATH, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    return r.status_code, r.headers.get("x-veil-cache", "")


def _stats(url: str) -> dict[str, Any]:
    from veil.testing import ADMIN_KEY

    r = httpx.get(url + "/admin/cache", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    if r.status_code != 200:
        raise BenchError(f"GET /admin/cache answered {r.status_code}: {r.text[:200]}")
    doc: dict[str, Any] = r.json()
    return doc


def unique_body(stream: bool) -> dict[str, Any]:
    """The main bench's request with a marker the load generator makes unique."""
    body = chat_body(stream)
    messages = [dict(m) for m in body["messages"]]  # type: ignore[union-attr]
    messages[-1]["content"] = f"[{MARKER}] " + str(messages[-1]["content"])
    body["messages"] = messages
    return body


class CacheScenario(StageScenario):
    """The cache stage's miss path (never-repeated requests) and hit path."""

    stage = "cache"
    gateways = ("miss", "hit")
    limit = 1.10
    example = "--connections 16 --repeat 5"
    quick_time = "about 1 minute"
    select_option = "--paths"
    select_help = "paths to measure against the core: miss, hit or both (default both)"
    ratio_width = 11

    def __init__(self) -> None:
        self.before: dict[str, dict[str, Any]] = {}

    def limit_of(self, gateway: str) -> float:
        return LIMITS[gateway]

    def target_name(self, gateway: str) -> str:
        if gateway == "hit":
            return "hit: a hit costs less CPU than the core-only gateway's miss path"
        return "miss: the miss path adds <= 10% CPU per request"

    def policy_tail(self, gateway: str) -> str:
        return "\n[cache]\nany_temperature = true\n"

    def body_file(self, setup: Setup, gateway: str, mode: str, default: Path) -> Path:
        """``hit``: the main bench's body, always the same. ``miss`` and ``core``: the
        never-repeated one, so that the two compared on the miss path see the same
        requests, sent the same way (the only difference is the stage)."""
        if gateway == "hit":
            return default
        path = setup.workdir / f"body-unique-{mode}.json"
        if not path.exists():
            path.write_bytes(orjson.dumps(unique_body(mode == "stream")))
        return path

    def preflight(self, setup: Setup, gateways: list[str]) -> None:
        """``miss`` misses on new requests, ``hit`` hits on a repeated one, core answers."""
        stage_cpu.check_answers(setup, [stage_cpu.CORE])
        for g in gateways:
            url = setup.base_url(g)
            for stream in (False, True):
                if g == "miss":
                    for n in (1, 2):
                        body = orjson.loads(
                            orjson.dumps(unique_body(stream)).replace(
                                MARKER.encode(), b"preflight-%d-%d" % (stream, n)
                            )
                        )
                        status, header = _post(url, body)
                        if (status, header) != (200, "miss"):
                            raise BenchError(f"gateway miss answered {status} {header!r}")
                else:
                    _post(url, chat_body(stream))
                    status, header = _post(url, chat_body(stream))
                    if (status, header) != (200, "hit"):
                        raise BenchError(f"gateway hit answered {status} {header!r}")
            self.before[g] = _stats(url)
        self.note("miss misses never-repeated requests; hit hits a repeated one")

    def after_load(self, setup: Setup, result: dict[str, Any]) -> None:
        """``cache``: each gateway's hits, misses and stored answers during the load."""
        result["cache"] = {}
        for g, before in self.before.items():
            after = _stats(setup.base_url(g))
            delta = {k: after[k] - before[k] for k in ("hits", "misses", "stored")}
            delta["entries"] = after["entries"]
            delta["bytes"] = after["bytes"]
            result["cache"][g] = delta
            if g == "miss" and delta["hits"]:
                raise BenchError(f"the miss gateway served {delta['hits']} hits: requests repeated")
            if g == "hit" and delta["misses"] > 4:
                raise BenchError(f"the hit gateway missed {delta['misses']} times")

    def report_lines(self, result: dict[str, Any], targets: list[str]) -> list[str]:
        lines = []
        mock = upstream_line(result, targets)
        if mock:
            lines.append(mock)
        for g, d in result.get("cache", {}).items():
            lines.append(
                f"{g}: {d['hits']} hits, {d['misses']} misses, {d['stored']} stored during the "
                f"load; {d['entries']} entries, {d['bytes']} bytes in the store"
            )
        return lines


def main(argv: list[str] | None = None) -> int:
    return stage_cpu.main(CacheScenario(), argv)


if __name__ == "__main__":
    sys.exit(main())
