"""CPU per call of veil's serve path in-process: the core alone against a stage.

A diagnostic for stage work, not a target check (``make bench`` judges the
targets on real servers). It starts gateways in this process (signed
policies, the real plugins), hands each request straight to
``veil.asgi.serve`` (no sockets), answers upstream calls from an instant
stub provider, and runs uvicorn's header checks on the answer the way the
server does (two regular expressions per header). So it measures what the
gateway's own Python code costs per call, without the server, the client
library, the kernel and the load generator that make up most of a served
call's CPU, and that a hot loop over one stage's hooks leaves out
(response headers, decisions, objects new to every call).

Each round runs ``--calls`` calls (non-streaming; with ``--stream``,
streaming, the stub's stream being what the bench's mock upstream sends for
the bench body: 47 chunks, parsed from their JSON for every call the way
the OpenAI-compatible provider does) from 16 concurrent callers per
gateway, the two gateways alternating order from round to round; the
figure is the process CPU time (all threads) per call, median over the
rounds. One stage per run: a stage's threads (the audit writer, a store's)
would be counted against the other gateways of the process.

    python -m bench.serve_inprocess                        # budget (SQLite) against the core
    python -m bench.serve_inprocess --stage budget-redis   # the Redis store, on a redis-server
    python -m bench.serve_inprocess --stage audit --rounds 12 --json
    python -m bench.serve_inprocess --stage cache --unique  # every call a miss
    python -m bench.serve_inprocess --stream               # streaming calls

Exit codes: 0 measured, 1 a gateway failed to start or a call failed, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stage_cpu
from bench.budget import budget_section
from bench.payloads import API_KEY, MODEL, chat_body, chat_body_bytes

STAGES = ("budget", "budget-redis", "audit", "cache")
"""``budget-redis``: the budget stage with the Redis store, on a ``redis-server`` this
tool starts (its CPU is not counted; its script calls per call are reported)."""
CALLERS = 16

_ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A short answer from the stub."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 150, "completion_tokens": 40, "total_tokens": 190},
    }
)


def _stream_frames() -> list[bytes]:
    """The chunks the mock upstream streams for the bench body, as JSON."""
    from veil.mock.engine import MockModel

    return [orjson.dumps(c) for c in MockModel().chat_chunks(chat_body(True))]


class InstantProvider:
    """An upstream that answers every chat call at once (the same answer;
    a stream: the mock upstream's chunks for the bench body)."""

    def __init__(self) -> None:
        self._frames = _stream_frames()

    async def chat(self, call: Any, deployment: Any, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(_ANSWER)
        return result

    async def chat_stream(self, call: Any, deployment: Any, body: dict[str, Any]) -> Any:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        for frame in self._frames:
            yield orjson.loads(frame)

    async def aclose(self) -> None:
        return None


def policy_tail(stage: str) -> str:
    """The stage's section: budget as ``bench.budget`` runs it (SQLite), the
    cache for any temperature (the bench body's is 0.2), audit's defaults."""
    if stage == "budget":
        return budget_section("sqlite")
    if stage == "budget-redis":
        return budget_section("redis")
    if stage == "cache":
        return "\n[cache]\nany_temperature = true\n"
    return ""


def uvicorn_header_checks(headers: list[tuple[bytes, bytes]]) -> bytes:
    """What uvicorn's httptools protocol does with each response header."""
    content = []
    for name, value in headers:
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            raise RuntimeError(f"invalid header {name!r}")
        name = name.lower()
        content.extend([name, b": ", value, b"\r\n"])
    return b"".join(content)


async def start_gateways(names: list[str], workdir: Path) -> dict[str, Any]:
    """Sign each gateway's policy and start it in this process."""
    from veil.gateway import Gateway, GatewayConfig
    from veil.testing import PolicyKit

    kit = PolicyKit(workdir)
    gateways: dict[str, Any] = {}
    for name in names:
        stage = None if name == stage_cpu.CORE else name
        text = stage_cpu.policy("http://127.0.0.1:9", stage and stage.removesuffix("-redis"))
        if stage is not None:
            text += policy_tail(stage)
        path = kit.write(text, f"{name}.toml")
        state = workdir / f"state-{name}"
        state.mkdir()
        os.environ["VEIL_STATE_DIR"] = str(state)  # where plugins keep their files
        config = GatewayConfig(
            policy_path=path,
            trusted_keys=(kit.public_key_path,),
            audience=stage_cpu.AUDIENCE,
            state_dir=state,
            tune_gc=True,
        )
        gateway = Gateway(config)
        await gateway.start()
        gateway.runtime.providers["openai"] = InstantProvider()
        gateways[name] = gateway
    return gateways


async def background_loads_done(names: list[str]) -> None:
    """Wait for what the stages of ``names`` load in background threads at
    start (the budget's tokenizer: about a second of CPU), which would
    otherwise be counted against the first rounds. Nothing is started for
    gateways without the budget stage."""
    if not any(name.startswith("budget") for name in names):
        return
    try:
        from veil_budget.tokens import encoding_ready
    except ImportError:  # the budget plugin is not installed
        return
    await encoding_ready()


def make_caller(gateway: Any, unique: bool, stream: bool = False) -> Callable[[], Awaitable[None]]:
    """One call through ``veil.asgi.serve``; raises unless it is answered 200
    (a stream: unless it ends with ``[DONE]``)."""
    from veil.asgi import serve

    body = chat_body_bytes(stream)
    seq = iter(range(1 << 62))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {API_KEY}".encode()),
        ],
    }
    never: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def call() -> None:
        sent = [False, False]  # the body was received; the stream's last write ended with [DONE]

        async def receive() -> dict[str, Any]:
            if sent[0]:  # a stream's disconnect watcher: the client never leaves
                return await asyncio.shield(never)
            sent[0] = True
            data = body.replace(b"You are", b"You are %d" % next(seq), 1) if unique else body
            return {"type": "http.request", "body": data, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                if message["status"] != 200:
                    raise RuntimeError(f"the gateway answered {message['status']}")
                uvicorn_header_checks(message["headers"])
            elif not message.get("more_body"):
                sent[1] = message.get("body", b"").endswith(b"data: [DONE]\n\n")

        await serve(gateway, "chat", scope, receive, send)
        if stream and not sent[1]:
            raise RuntimeError("a stream ended without [DONE]")

    return call


async def cpu_us_per_call(call: Callable[[], Awaitable[None]], calls: int) -> float:
    """Process CPU microseconds per call over ``calls`` calls from 16 callers."""
    each = max(1, calls // CALLERS)

    async def caller() -> None:
        for _ in range(each):
            await call()

    start = time.process_time()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return (time.process_time() - start) / (each * CALLERS) * 1e6


def script_calls(redis: Any) -> int:
    """Script calls ``redis`` (a :class:`veil.testing.RedisServer`) has run so far."""
    stats = redis.command("INFO", "commandstats").decode()
    calls = 0
    for line in stats.splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            calls += int(line.split("calls=")[1].split(",")[0])
    return calls


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    names = [stage_cpu.CORE, args.stage]
    redis = None
    if args.stage == "budget-redis":
        from veil.testing import RedisServer

        redis = RedisServer().wait_ready()
        os.environ["VEIL_BUDGET_REDIS_URL"] = redis.url
    try:
        return await _measure(args, names, redis)
    finally:
        if redis is not None:
            redis.stop()


async def _measure(args: argparse.Namespace, names: list[str], redis: Any) -> dict[str, Any]:
    scripts = 0
    with tempfile.TemporaryDirectory(prefix="veil-inprocess-") as tmp:
        gateways = await start_gateways(names, Path(tmp))
        try:
            await background_loads_done(names)
            callers = {n: make_caller(g, args.unique, args.stream) for n, g in gateways.items()}
            for n in names:  # warm-up: imports, first plans, the stores' first pages
                await cpu_us_per_call(callers[n], 2000)
            samples: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.rounds):
                print(f"[{r + 1}/{args.rounds}] round", file=sys.stderr, flush=True)
                for n in names if r % 2 == 0 else names[::-1]:
                    before = script_calls(redis) if redis is not None and n != names[0] else 0
                    samples[n].append(await cpu_us_per_call(callers[n], args.calls))
                    if redis is not None and n != names[0]:
                        scripts += script_calls(redis) - before
        finally:
            for g in gateways.values():
                await g.stop()
    core = statistics.median(samples[stage_cpu.CORE])
    extra = {}
    if redis is not None:
        measured = args.rounds * max(1, args.calls // CALLERS) * CALLERS
        extra["redis_script_calls_per_call"] = round(scripts / measured, 4)
    return {
        **extra,
        "calls_per_round": args.calls,
        "rounds": args.rounds,
        "unique": args.unique,
        "stream": args.stream,
        "gateways": {
            n: {
                "cpu_us_per_call": round(statistics.median(s), 2),
                "added_us": round(statistics.median(s) - core, 2),
                "ratio": round(statistics.median(s) / core, 3),
                "rounds_us": [round(x, 1) for x in s],
            }
            for n, s in samples.items()
        },
    }


def render(result: dict[str, Any]) -> str:
    head = f"{'gateway':10s} {'CPU us/call':>12s} {'added us':>9s} {'ratio':>7s}"
    lines = [head + "  rounds (min-max)"]
    if "redis_script_calls_per_call" in result:
        lines.insert(0, f"Redis script calls per call: {result['redis_script_calls_per_call']}")
    for name, g in result["gateways"].items():
        lo, hi = min(g["rounds_us"]), max(g["rounds_us"])
        lines.append(
            f"{name:10s} {g['cpu_us_per_call']:12.1f} {g['added_us']:+9.1f} "
            f"{g['ratio']:6.3f}x  {lo:.1f}-{hi:.1f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_inprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m bench.serve_inprocess --stage cache --unique --rounds 12",
    )
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default="budget",
        help="the stage to measure against the core (default budget); one per run, since "
        "process CPU counts every thread's (the audit writer's, a store's)",
    )
    parser.add_argument(
        "--calls", type=int, default=6000, help="calls per gateway and round (default 6000)"
    )
    parser.add_argument("--rounds", type=int, default=8, help="rounds (default 8)")
    parser.add_argument(
        "--unique",
        action="store_true",
        help="make every request different (the cache's miss path)",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="streaming calls (the stub streams the mock upstream's 47 chunks)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.calls < CALLERS or args.rounds < 1:
        print(f"error: --calls must be at least {CALLERS} and --rounds at least 1", file=sys.stderr)
        return 2
    # audit needs its HMAC key; a throwaway one (the files go with the temp dir)
    os.environ.setdefault("VEIL_AUDIT_HMAC_KEY", secrets.token_hex(32))
    from veil.logs import configure_logging

    configure_logging("warning")
    try:
        import uvloop

        result = uvloop.run(measure(args))
    except Exception as e:  # noqa: BLE001 - one line saying what failed, exit 1
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
