"""Starting, probing and always stopping the server processes under test.

Every process is started in its own session (so a Ctrl-C in the terminal does not reach it
and the whole tree can be signalled at once) and registered with a ``Supervisor`` whose
``stop_all`` runs from ``finally`` blocks and from ``atexit``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class ServerStartError(RuntimeError):
    """A server exited or never answered correctly while starting."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def child_preexec(cpus: Sequence[int] | None) -> Callable[[], None]:
    """A ``preexec_fn``: pin the child to ``cpus`` (like ``taskset -c``) before exec, and
    have the kernel SIGTERM it if the harness dies without cleaning up (even on SIGKILL)."""
    cpu_set = set(cpus or ())

    def _setup() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpu_set:
            os.sched_setaffinity(0, cpu_set)

    return _setup


@dataclass
class Server:
    """A started server process."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def http_post(url: str, body: bytes, headers: dict[str, str], timeout: float = 5.0) -> int:
    """POST and read the whole answer; return the HTTP status (raises OSError if down)."""
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        err.read()
        return int(err.code)


@dataclass
class Supervisor:
    """Owns every process the harness starts and guarantees they are terminated."""

    log_dir: Path
    servers: list[Server] = field(default_factory=list)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        atexit.register(self.stop_all)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        cpus: Sequence[int] | None = None,
    ) -> Server:
        """Start ``argv`` with output to ``<log_dir>/<name>.log``."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=child_preexec(cpus),
                )
            except OSError as err:
                raise ServerStartError(f"{name}: cannot run {argv[0]}: {err}") from err
        server = Server(name, proc, port, log_path)
        self.servers.append(server)
        return server

    def wait_ready(
        self,
        server: Server,
        url: str,
        body: bytes,
        headers: dict[str, str],
        timeout: float = 30.0,
    ) -> None:
        """Poll ``url`` with a real request until it answers 2xx, or raise ServerStartError."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            code = server.proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"{server.name} exited with code {code} while starting; "
                    f"log {server.log_path}:\n{tail(server.log_path)}"
                )
            try:
                status = http_post(url, body, headers, timeout=5.0)
            except OSError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if 200 <= status < 300:
                    return
                last = f"HTTP {status}"
            time.sleep(0.1)
        raise ServerStartError(
            f"{server.name} did not answer 2xx on {url} within {timeout:.0f}s (last: {last}); "
            f"log {server.log_path}:\n{tail(server.log_path)}"
        )

    def track(self, proc: subprocess.Popen[bytes]) -> None:
        """Also terminate this (non-server) process in ``stop_all``."""
        self.others.append(proc)

    def untrack(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ValueError):
            self.others.remove(proc)

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every process group we started, then SIGKILL what is left after ``grace``."""
        procs = [*self.others, *(s.proc for s in reversed(self.servers))]
        self.others.clear()
        self.servers.clear()
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
            # A group may outlive its leader (forked workers): make sure it is gone.
            _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group led by ``proc`` (it was started with a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
