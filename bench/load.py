"""Running one load measurement with wrk (preferred) or the Python fallback generator.

Both print a ``BENCH_JSON {...}`` line that ``parse_summary`` turns into a ``LoadResult``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from bench.procs import Supervisor, child_preexec

HERE = Path(__file__).resolve().parent
LUA_SCRIPT = HERE / "wrk_post.lua"
MARKER = "BENCH_JSON "


class LoadError(RuntimeError):
    """The load generator failed or printed no summary."""


@dataclass
class LoadResult:
    """Summary of one load run, as reported by the load generator."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    bytes: int
    non2xx: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int

    @property
    def errors(self) -> int:
        """Non-2xx answers plus socket errors (connect, read, write, timeout)."""
        return (
            self.non2xx + self.connect_errors + self.read_errors + self.write_errors + self.timeouts
        )

    def to_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "errors": self.errors}


def parse_summary(output: str) -> LoadResult:
    """Find the ``BENCH_JSON`` line in a load generator's stdout."""
    for line in output.splitlines():
        if line.startswith(MARKER):
            raw = json.loads(line[len(MARKER) :])
            break
    else:
        raise LoadError("load generator printed no BENCH_JSON summary")
    duration = raw["duration_us"] / 1e6
    return LoadResult(
        requests=int(raw["requests"]),
        duration_s=round(duration, 3),
        rps=raw["requests"] / duration if duration > 0 else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        bytes=int(raw["bytes"]),
        non2xx=int(raw["status"]),
        connect_errors=int(raw["connect"]),
        read_errors=int(raw["read"]),
        write_errors=int(raw["write"]),
        timeouts=int(raw["timeout"]),
    )


def find_wrk() -> str | None:
    """Path of ``wrk`` on PATH, or None."""
    return shutil.which("wrk")


def wrk_version(wrk: str) -> str:
    """First line of ``wrk -v`` (e.g. ``wrk 4.1.0 ...``)."""
    proc = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    lines = (proc.stdout or proc.stderr).splitlines()
    return lines[0].split(" [")[0].strip() if lines else "wrk"


@dataclass
class LoadGenerator:
    """How to run loads: which tool, how many wrk threads, which CPUs it may use."""

    wrk: str | None
    wrk_threads: int = 1
    cpus: list[int] | None = None
    request_timeout_s: int = 10
    repo_root: Path = HERE.parent

    @cached_property
    def name(self) -> str:
        return wrk_version(self.wrk) if self.wrk else "python (bench/loadgen.py)"

    def command(
        self, url: str, conns: int, duration_s: int, body_file: Path, key: str
    ) -> list[str]:
        """The command line for one run."""
        if self.wrk:
            threads = max(1, min(self.wrk_threads, conns))
            return [
                self.wrk,
                f"-t{threads}",
                f"-c{conns}",
                f"-d{duration_s}s",
                f"--timeout={self.request_timeout_s}s",
                "-s",
                str(LUA_SCRIPT),
                url,
            ]
        return [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--url",
            url,
            "--connections",
            str(conns),
            "--duration",
            str(duration_s),
            "--body-file",
            str(body_file),
            "--api-key",
            key,
            "--timeout",
            str(self.request_timeout_s),
        ]

    def run(
        self,
        supervisor: Supervisor,
        url: str,
        conns: int,
        duration_s: int,
        body_file: Path,
        api_key: str,
    ) -> LoadResult:
        """Run one load to completion and return its summary."""
        env = dict(os.environ)
        env["BENCH_BODY_FILE"] = str(body_file)
        env["BENCH_API_KEY"] = api_key
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.repo_root), env.get("PYTHONPATH", "")) if p
        )
        proc = subprocess.Popen(
            self.command(url, conns, duration_s, body_file, api_key),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.repo_root,
            start_new_session=True,
            preexec_fn=child_preexec(self.cpus),
        )
        supervisor.track(proc)
        try:
            out, err = proc.communicate(timeout=duration_s + 2 * self.request_timeout_s + 30)
        except subprocess.TimeoutExpired as exc:
            raise LoadError(f"load generator did not finish: {' '.join(proc.args)}") from exc
        finally:
            supervisor.untrack(proc)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise LoadError(
                f"load generator exited {proc.returncode}: {err.decode(errors='replace')[-800:]}"
            )
        return parse_summary(out.decode(errors="replace"))
