"""Test helpers for veil and for plugin authors (a pytest plugin too).

- :class:`PolicyKit` makes a throwaway signing key and writes signed policies.
- :func:`policy_toml` renders a policy with sensible defaults.
- :class:`ServerThread` runs an ASGI app (the gateway, or the mock upstream)
  on 127.0.0.1 on a free port, in a background thread, as a real server.
- :class:`GatewayProcess` runs ``veil serve`` as a subprocess (for signals,
  restarts and exit codes).

Fixtures (registered through the ``pytest11`` entry point): ``policy_kit``,
``mock_upstream``, ``start_gateway``, ``redis_server`` (a real
``redis-server`` the tests start; :class:`RedisServer`).

Example, for a plugin author::

    def test_my_stage(policy_kit, start_gateway):
        path = policy_kit.write(policy_toml(pipeline=["myplugin"]))
        with start_gateway(path, plugins={"myplugin": my_plugin_module}) as gw:
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key=TEST_KEY)
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "ADMIN_KEY",
    "GatewayProcess",
    "OTHER_KEY",
    "PolicyKit",
    "RedisServer",
    "ServerThread",
    "TEST_KEY",
    "free_port",
    "policy_toml",
]

TEST_KEY = "sk-veil-test-key"
"""The API key of team ``test`` in :func:`policy_toml` policies."""
ADMIN_KEY = "sk-veil-test-admin"
"""An admin key of team ``test`` in :func:`policy_toml` policies."""
OTHER_KEY = "sk-veil-test-other"
"""The API key of team ``other`` in :func:`policy_toml` policies."""


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"
    raise TypeError(f"cannot render {type(v).__name__} as TOML")


def policy_toml(
    *,
    version: int = 1,
    audience: str = "test",
    issued_at: str = "2020-01-01T00:00:00Z",
    expires_at: str = "2099-01-01T00:00:00Z",
    pipeline: Sequence[str] = (),
    plugins: Mapping[str, Mapping[str, Any]] | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    deployments: Sequence[Mapping[str, Any]] | None = None,
    gateway: Mapping[str, Any] | None = None,
    extra: str = "",
) -> str:
    """Render a policy: teams ``test`` and ``other``, keys :data:`TEST_KEY`,
    :data:`ADMIN_KEY` and :data:`OTHER_KEY`, and by default two mock
    deployments (``mock-model`` for everyone, ``test-only`` for team test)
    and ``mock-embed``."""
    if deployments is None:
        deployments = [
            {
                "name": "mock-model",
                "provider": "mock",
                "model": "mock-1",
                "input_per_mtok": 1.0,
                "output_per_mtok": 2.0,
                "context_window": 8192,
            },
            {"name": "test-only", "provider": "mock", "model": "mock-2", "teams": ["test"]},
            {"name": "mock-embed", "provider": "mock", "model": "mock-embed"},
        ]
    lines = [
        "[policy]",
        f"version = {version}",
        'issuer = "tests@veil.local"',
        f"audience = {_toml_value(audience)}",
        f"issued_at = {issued_at}",
        f"expires_at = {expires_at}",
        "",
        "[gateway]",
        f"pipeline = {_toml_value(list(pipeline))}",
    ]
    for k, v in (gateway or {}).items():
        lines.append(f"{k} = {_toml_value(v)}")
    for name, entry in (plugins or {}).items():
        lines += ["", f"[plugins.{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
    lines += ["", "[[teams]]", 'id = "test"', "", "[[teams]]", 'id = "other"']
    for kid, key, team, admin in (
        ("test", TEST_KEY, "test", False),
        ("test-admin", ADMIN_KEY, "test", True),
        ("other", OTHER_KEY, "other", False),
    ):
        lines += ["", "[[keys]]", f'id = "{kid}"', f'team = "{team}"', f'sha256 = "{_sha(key)}"']
        if admin:
            lines.append("admin = true")
    for d in deployments:
        lines += ["", "[[deployments]]"] + [f"{k} = {_toml_value(v)}" for k, v in d.items()]
    for name, section in (sections or {}).items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in section.items()]
    return "\n".join(lines) + "\n" + extra


class PolicyKit:
    """A throwaway signing key in ``root`` and helpers to write signed policies."""

    def __init__(self, root: Path) -> None:
        from .policy.signing import generate_keypair, load_private_key

        self.root = root
        self.keys_dir = root / "keys"
        self.private_key_path, self.public_key_path = generate_keypair(self.keys_dir)
        self.private_key = load_private_key(self.private_key_path)
        self.state_dir = root / "state"

    def write(self, text: str | bytes, name: str = "gateway.toml", *, sign: bool = True) -> Path:
        """Write a policy file (and its signature unless ``sign=False``)."""
        from .policy.signing import sign_file, signature_path

        path = self.root / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        if sign:
            sign_file(path, self.private_key)
        else:
            signature_path(path).unlink(missing_ok=True)
        return path

    def config(self, path: Path, **kw: Any) -> Any:
        """A :class:`~veil.gateway.GatewayConfig` trusting this kit's key."""
        from .gateway import GatewayConfig

        kw.setdefault("audience", "test")
        kw.setdefault("state_dir", self.state_dir)
        kw.setdefault("watch_interval", 0.2)
        return GatewayConfig(policy_path=path, trusted_keys=[self.public_key_path], **kw)


class ServerThread:
    """Serve an ASGI app with uvicorn on 127.0.0.1:<free port> in a thread.

    Use as a context manager; ``url`` is ``http://127.0.0.1:PORT``. Start-up
    failures (a refused policy) raise :class:`RuntimeError` from ``start()``,
    with the app's exception as ``__cause__`` when known.
    """

    def __init__(self, app: Any, *, port: int | None = None) -> None:
        import uvicorn

        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            loop="asyncio",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_level="critical",
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"veil-test-{self.port}")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self.error = e

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    def start(self, timeout: float = 20.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} failed to start") from self.error
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's event loop (e.g. ``gateway.reload()``)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def gateway(self) -> Any:
        """The :class:`~veil.gateway.Gateway` of a gateway app."""
        return self.app.state.gateway

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Stop a child process: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class GatewayProcess:
    """``veil serve`` as a subprocess on a free port; ``url``, ``send_signal``, ``stop``.

    ``command_prefix`` runs it under another program (``valgrind ...``: that
    program must exec the gateway in its own process, so ``proc.pid`` stays
    the gateway's)."""

    def __init__(
        self,
        policy: Path,
        trusted_key: Path,
        *,
        audience: str = "test",
        state_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            *command_prefix,
            sys.executable,
            "-m",
            "veil",
            "serve",
            "--policy",
            str(policy),
            "--trusted-key",
            str(trusted_key),
            "--audience",
            audience,
            "--port",
            str(self.port),
            "--state-dir",
            str(state_dir or tempfile.mkdtemp(prefix="veil-state-")),
            *extra_args,
        ]
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the process
            prefix="veil-serve-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_ready(self, timeout: float = 30.0) -> GatewayProcess:
        """Wait for ``/readyz``; raise with the log if the process exits first."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"veil serve exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"veil serve not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def send_signal(self, sig: int = signal.SIGHUP) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        _terminate(self.proc)
        self.log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log.name)

    def __enter__(self) -> GatewayProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1:<free port>, without persistence,
    for tests of Redis-backed storage (budgets, rate limits, cache, mappings).

    ``url`` is ``redis://127.0.0.1:PORT/0``. :raises FileNotFoundError: when
    ``redis-server`` is not on PATH (``make test`` installs it).
    """

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="veil-redis-")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def command(self, *args: str) -> bytes:
        """Send one command (RESP) and return the raw reply, e.g. ``b"+PONG\\r\\n"``."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload.encode())
            return s.recv(65536)

    def wait_ready(self, timeout: float = 10.0) -> RedisServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                if self.command("PING").startswith(b"+PONG"):
                    return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not ready after {timeout}s")

    def stop(self) -> None:
        _terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- pytest fixtures -------------------------------------------------------------


@pytest.fixture
def policy_kit(tmp_path: Path) -> PolicyKit:
    """A throwaway signing key; ``policy_kit.write(policy_toml(...))`` writes a signed policy."""
    return PolicyKit(tmp_path)


@pytest.fixture
def mock_upstream() -> Iterator[ServerThread]:
    """``veil mock-upstream`` on a free port; ``.app.settings`` changes its behaviour."""
    from .mock.server import MockUpstream

    with ServerThread(MockUpstream()) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real ``redis-server`` for the session; skipped, saying why, when it is
    not installed. Flush it between tests that need a clean store."""
    try:
        server = RedisServer()
    except FileNotFoundError as e:
        pytest.skip(f"{e}; `make test` installs it")
    with server:
        yield server


@pytest.fixture
def start_gateway(
    policy_kit: PolicyKit,
) -> Iterator[Callable[..., ServerThread]]:
    """``start_gateway(policy_path, plugins={...}, **config)``: the real gateway
    on a free port (a context manager, stopped at the end of the test)."""
    from .app import create_app

    started: list[ServerThread] = []

    def start(path: Path, plugins: Mapping[str, Any] | None = None, **kw: Any) -> ServerThread:
        config = policy_kit.config(path, extra_plugins=dict(plugins or {}), **kw)
        server = ServerThread(create_app(config))
        started.append(server)
        return server.start()

    yield start
    for s in started:
        s.stop()
