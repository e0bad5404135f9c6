"""Pure-Python load generator (aiohttp), used when ``wrk`` is not installed.

N concurrent keep-alive connections each send POST requests back to back for a fixed
duration, read every response to the end (the whole SSE stream for streaming requests)
and record its latency. Prints one JSON object in the same shape as ``wrk_post.lua``
(``BENCH_JSON {...}``). It needs far more CPU per request than wrk, so on a small machine
it steals more from the servers under test: prefer wrk.

Run: ``python -m bench.loadgen --url http://127.0.0.1:8000/v1/chat/completions
--connections 16 --duration 10 --body-file body.json --api-key sk-veil-x``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

UNIQUE_MARKER = b"__BENCH_SEQ__"
"""Replaced in each request by a value never sent before (as ``wrk_post.lua`` does)."""


@dataclass
class Tally:
    """What the workers observed."""

    latencies_us: list[float] = field(default_factory=list)
    bytes: int = 0
    status: int = 0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    deadline: float,
    tally: Tally,
) -> None:
    unique = UNIQUE_MARKER in body
    salt = os.urandom(6).hex().encode()
    seq = 0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        data = body
        if unique:  # a request never sent before (see wrk_post.lua)
            seq += 1
            data = body.replace(UNIQUE_MARKER, salt + b"-%d" % seq, 1)
        try:
            async with session.post(url, data=data, headers=headers) as resp:
                payload = await resp.read()
        except aiohttp.ClientConnectorError:
            tally.connect += 1
            await asyncio.sleep(0.01)
            continue
        except TimeoutError:
            tally.timeout += 1
            continue
        except aiohttp.ClientError:
            tally.read += 1
            continue
        end = time.perf_counter()
        if end > deadline:
            break  # like wrk: responses finishing after the deadline are not counted
        tally.latencies_us.append((end - start) * 1e6)
        tally.bytes += len(payload)
        if not 200 <= resp.status < 300:
            tally.status += 1


async def run(
    url: str, connections: int, duration: float, body: bytes, api_key: str, timeout: float
) -> dict[str, float | int]:
    """Drive the load and return the summary dict (latencies in microseconds)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    tally = Tally()
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        start = time.perf_counter()
        deadline = start + duration
        workers = [
            asyncio.create_task(_worker(session, url, body, headers, deadline, tally))
            for _ in range(connections)
        ]
        await asyncio.wait(workers, timeout=duration + timeout + 1)
        for task in workers:
            task.cancel()
        elapsed = min(time.perf_counter(), deadline) - start
    lat = sorted(tally.latencies_us)
    return {
        "requests": len(lat),
        "duration_us": int(elapsed * 1e6),
        "bytes": tally.bytes,
        "p50_us": int(percentile(lat, 50)),
        "p90_us": int(percentile(lat, 90)),
        "p99_us": int(percentile(lat, 99)),
        "max_us": int(lat[-1]) if lat else 0,
        "mean_us": round(sum(lat) / len(lat), 1) if lat else 0.0,
        "connect": tally.connect,
        "read": tally.read,
        "write": tally.write,
        "status": tally.status,
        "timeout": tally.timeout,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run, print ``BENCH_JSON {...}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", "-c", type=int, default=16)
    parser.add_argument("--duration", "-d", type=float, default=10.0, help="seconds")
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    args = parser.parse_args(argv)
    body = args.body_file.read_bytes()
    coro = run(args.url, args.connections, args.duration, body, args.api_key, args.timeout)
    try:
        import uvloop
    except ImportError:
        summary = asyncio.run(coro)
    else:
        summary = uvloop.run(coro)
    print("BENCH_JSON " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
