"""Detection: offline, accurate on labelled data, configurable from the policy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from piitest import PLUGIN, SAMPLE, labelled_data
from veil_pii.cli import pii
from veil_pii.detector import Detector, ModelNotInstalled, candidate_sentences
from veil_pii.evaluate import Tally, read_records
from veil_pii.settings import PiiSettings

from veil.cli import cli as veil_cli


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(PiiSettings())


def kinds(detector: Detector, text: str) -> dict[str, str]:
    return {text[f.start : f.end]: f.entity_type for f in detector.analyze(text)}


# -- nothing is downloaded ---------------------------------------------------------

_GUARD = """
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[:2])
    sys.stderr.write(f"NETWORK ATTEMPT {args[:2]!r}\\n")
    raise OSError("network blocked by the test")
socket.getaddrinfo = refuse
socket.create_connection = refuse
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
"""


def test_detection_runs_with_the_network_blocked(tmp_path: Path) -> None:
    """Load the model and the recognizers, then analyse e-mail addresses and
    URLs (tldextract's first use) with every socket connection refused."""
    script = _GUARD + textwrap.dedent(
        """
        import logging
        logging.basicConfig(level=logging.WARNING)
        from veil_pii.detector import Detector
        from veil_pii.settings import PiiSettings
        d = Detector(PiiSettings(entities=("EMAIL_ADDRESS", "URL", "PERSON", "PHONE_NUMBER")))
        text = "Mail zoe.young@acme.co.uk or see https://www.acme.com.au/team, Zoe Young"
        found = d.analyze(text)
        print(sorted(f.entity_type for f in found))
        assert not attempts, attempts
        """
    )
    env = {"PYTHONPATH": str(PLUGIN), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NETWORK ATTEMPT" not in result.stderr
    assert "EMAIL_ADDRESS" in result.stdout and "URL" in result.stdout
    assert not any(tmp_path.iterdir()), "detection wrote a cache file"


def test_a_missing_model_is_refused_with_a_fix_not_downloaded() -> None:
    with pytest.raises(ModelNotInstalled, match="not installed; install its package"):
        Detector(PiiSettings(spacy_model="en_core_web_trf"))


# -- quality -------------------------------------------------------------------------


def test_leak_rate_and_precision_on_labelled_data(detector: Detector) -> None:
    """The issue's targets, on the dev data (or the vendored sample of it)."""
    settings = PiiSettings()
    tally = Tally(settings.acted_on)
    for record in read_records(labelled_data()):
        tally.add(record, detector.analyze(record.text))
    report = tally.report()
    assert report["leak_rate"] <= 0.05
    for kind in ("PERSON", "STREET_ADDRESS", "PHONE_NUMBER"):
        assert report["per_type"][kind]["leak_rate"] <= 0.05, kind
    assert report["precision_any"] >= 0.85


@pytest.mark.parametrize(
    "text",
    [
        "Last night I went to the store this morning and bought milk.",
        "Write a Python function that sorts a list of 1000 integers.",
        "Revenue grew 12% to $4.5 million in Q3 2024.",
        "Order number 123456789 was shipped on March 3rd.",
        "Hi, can you help me with my homework?",
        "I'm happy to help.",
        "Subclass BaseModel and return a JSONResponse from the handler.",
        "Read the README, then send SIGHUP to reload; sha256 and Ed25519 keys are fine.",
        "Latency ratio was 0.43-0.56 across 400/404/422 pass cases.",
    ],
)
def test_ordinary_text_is_left_alone(detector: Detector, text: str) -> None:
    assert detector.analyze(text) == []


@pytest.mark.parametrize(
    ("text", "value", "kind"),
    [
        ("Call me on +41 (0)96 471 07 95 tomorrow", "+41 (0)96 471 07 95", "PHONE_NUMBER"),
        ("Phone: 467 3395", "467 3395", "PHONE_NUMBER"),
        ("They're not answering at 78 651 450", "78 651 450", "PHONE_NUMBER"),
        ("Charge 4064557646766436702 please", "4064557646766436702", "CREDIT_CARD"),
        ("Send it to 14 Crown Street, London", "14 Crown Street, London", "STREET_ADDRESS"),
        ("sometimes people call me višeslav", "višeslav", "PERSON"),
        ("Mehrudin shouted at Todd: stop!", "Todd", "PERSON"),
        ("my name is borna jerković", "borna jerković", "PERSON"),
    ],
)
def test_hard_cases_are_found(detector: Detector, text: str, value: str, kind: str) -> None:
    found = kinds(detector, text)
    assert any(value in span for span in found), found
    assert kind in found.values()


def test_dates_are_only_reported_when_absolute() -> None:
    detector = Detector(PiiSettings(entities=("DATE_TIME",)))
    assert kinds(detector, "I was born on 10/23/1951, last night was fun") == {
        "10/23/1951": "DATE_TIME"
    }


def test_allow_list_and_custom_recognizer_with_context() -> None:
    settings = PiiSettings.model_validate(
        {
            "allow_list": ["Zoe Young"],
            "recognizers": [
                {
                    "entity": "TICKET",
                    "patterns": [r"\bT\d{5}\b"],
                    "context": ["ticket"],
                    "score": 0.3,
                }
            ],
        }
    )
    detector = Detector(settings)
    text = "Zoe Young opened ticket T12345. " + "Nothing else happened. " * 4 + "Part T99999."
    found = kinds(detector, text)
    assert found == {"T12345": "TICKET"}  # context lifts 0.3 over the 0.5 threshold


def test_policy_section_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        PiiSettings.model_validate({"recognizers": [{"entity": "X", "patterns": ["("]}]})
    with pytest.raises(ValueError, match="not detected: FOO"):
        PiiSettings.model_validate({"actions": {"FOO": "block"}})
    with pytest.raises(ValueError, match="capitals"):
        PiiSettings.model_validate({"entities": ["person"]})
    with pytest.raises(ValueError, match="unscanned_parts: 'Image URL' is not a content part"):
        PiiSettings.model_validate({"unscanned_parts": ["Image URL"]})
    with pytest.raises(ValueError, match="'text' parts are text and always scanned"):
        PiiSettings.model_validate({"unscanned_parts": ["text"]})


# -- the command line ---------------------------------------------------------------


def test_eval_prints_the_figures_as_json_and_gates() -> None:
    runner = CliRunner()
    result = runner.invoke(pii, ["eval", "--data", str(SAMPLE), "--limit", "60", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("leak_rate", "precision_any", "recall_any", "per_type"):
        assert key in report
    assert {"leak_rate", "recall", "n"} <= set(report["per_type"]["PERSON"])
    gated = runner.invoke(
        pii, ["eval", "--data", str(SAMPLE), "--limit", "60", "--max-leak-rate", "0"]
    )
    assert gated.exit_code == 5
    assert "above --max-leak-rate" in gated.stderr


def test_eval_refuses_bad_data_with_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "spans": []}\n{"text": 1}\n')
    result = CliRunner().invoke(pii, ["eval", "--data", str(bad)])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.stderr


def test_check_shows_what_the_upstream_receives() -> None:
    result = CliRunner().invoke(
        pii, ["check", "Write to Zoe Young at zoe.young@acme.com", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["upstream_receives"] == "Write to <PERSON_1> at <EMAIL_ADDRESS_1>"


def test_the_veil_command_has_the_pii_group() -> None:
    from veil.cli import _load_plugin_commands

    _load_plugin_commands()
    result = CliRunner().invoke(veil_cli, ["pii", "--help"])
    assert result.exit_code == 0
    assert "eval" in result.output and "check" in result.output


def test_blocked_types_are_found_before_the_ner_model_runs() -> None:
    detector = Detector(PiiSettings.model_validate({"actions": {"CREDIT_CARD": "block"}}))
    text = "Zoe Young pays with 4111 1111 1111 1111."
    assert [f.entity_type for f in detector.prescan(text)] == ["CREDIT_CARD"]
    assert [f.entity_type for f in detector.analyze(text, stop_at_block=True)] == ["CREDIT_CARD"]
    assert {f.entity_type for f in detector.analyze(text)} == {"PERSON", "CREDIT_CARD"}
    assert detector.prescan("Zoe Young pays cash.") == []


def test_the_ner_model_reads_only_sentences_that_may_hold_a_name(detector: Detector) -> None:
    gate = detector.engine.nlp_engine.person_words
    assert gate is not None
    text = "Hello there. Mr. Smith called on Monday! We spoke; e.g. about it.\nThe end."
    assert [text[a:b] for a, b in candidate_sentences(text, gate)] == [
        "Mr. Smith called on Monday! "
    ]
    assert not gate("HTTP") and gate("ZOE") and not gate("Users") and gate("Kaczmarek")
    # dates, places and organisations need every sentence: no gate then
    wide = Detector(PiiSettings.model_validate({"entities": ["PERSON", "LOCATION"]}))
    assert wide.engine.nlp_engine.person_words is None


def test_reading_candidate_sentences_only_finds_what_reading_everything_finds(
    detector: Detector,
) -> None:
    """The gate saves model time without losing names: on the labelled
    data, the findings with and without it leak the same share of values."""
    engine = detector.engine.nlp_engine
    gate = engine.person_words
    settings = PiiSettings()
    gated, full = Tally(settings.acted_on), Tally(settings.acted_on)
    try:
        for record in read_records(labelled_data()):
            engine.person_words = gate
            gated.add(record, detector.analyze(record.text))
            engine.person_words = None
            full.add(record, detector.analyze(record.text))
    finally:
        engine.person_words = gate
    assert gated.report()["leak_rate"] <= full.report()["leak_rate"] + 0.005
    assert gated.report()["per_type"]["PERSON"]["recall"] >= (
        full.report()["per_type"]["PERSON"]["recall"] - 0.01
    )


def test_every_module_declares_a_sorted_public_api() -> None:
    import importlib
    import pkgutil

    import veil_pii

    for info in pkgutil.walk_packages(veil_pii.__path__, "veil_pii."):
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        assert names is not None, f"{info.name} has no __all__"
        assert list(names) == sorted(names), info.name
        assert all(hasattr(module, n) for n in names), info.name
