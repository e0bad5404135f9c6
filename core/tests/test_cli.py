"""The command line: help that teaches, --json for machines, exit codes that mean something."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from veil.cli import EXIT_POLICY, cli
from veil.policy import parse_policy
from veil.testing import policy_toml


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_help_lists_every_command_and_exit_codes() -> None:
    code, out = run("--help")
    assert code == 0
    for command in ("policy", "key", "plugins", "serve", "mock-upstream"):
        assert command in out
    assert "3 policy refused" in out


def test_keygen_sign_verify_round_trip(tmp_path: Path) -> None:
    code, out = run("policy", "keygen", "--out", str(tmp_path / "k"), "--json")
    assert code == 0
    keys = json.loads(out)
    assert (Path(keys["private_key"]).stat().st_mode & 0o777) == 0o600
    policy = tmp_path / "p.toml"
    policy.write_text(policy_toml(version=4))
    code, out = run("policy", "sign", str(policy), "--key", keys["private_key"], "--json")
    assert code == 0 and json.loads(out)["version"] == 4
    code, out = run(
        "policy",
        "verify",
        str(policy),
        "--trusted-key",
        keys["public_key"],
        "--audience",
        "test",
        "--json",
    )
    assert code == 0 and json.loads(out)["valid"] is True
    # refusals exit 3 and say why
    code, out = run(
        "policy",
        "verify",
        str(policy),
        "--trusted-key",
        keys["public_key"],
        "--audience",
        "prod",
        "--json",
    )
    assert code == EXIT_POLICY and "audience" in json.loads(out)["error"]
    policy.write_text(policy.read_text() + "\n# edited\n")
    code, out = run("policy", "verify", str(policy), "--trusted-key", keys["public_key"])
    assert code == EXIT_POLICY and "does not match" in out
    # a second keygen into the same place refuses to overwrite
    code, out = run("policy", "keygen", "--out", str(tmp_path / "k"))
    assert code == 1 and "--force" in out


def test_sign_refuses_an_invalid_policy(tmp_path: Path) -> None:
    run("policy", "keygen", "--out", str(tmp_path / "k"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nversion = 0\n")
    code, out = run("policy", "sign", str(bad), "--key", str(tmp_path / "k" / "veil-policy.key"))
    assert code == EXIT_POLICY and "invalid policy" in out
    assert not (tmp_path / "bad.toml.sig").exists()


def test_key_new_prints_a_recognizable_key_and_its_policy_entry() -> None:
    code, out = run("key", "new", "--team", "payments", "--admin", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["key"].startswith("sk-veil-") and len(data["key"]) > 40
    assert data["sha256"] == hashlib.sha256(data["key"].encode()).hexdigest()
    assert 'team = "payments"' in data["toml"] and "admin = true" in data["toml"]
    # the printed block is valid policy TOML
    text = policy_toml().replace(
        '[[teams]]\nid = "other"', '[[teams]]\nid = "other"\n\n[[teams]]\nid = "payments"'
    )
    parsed = parse_policy((text + "\n" + data["toml"]).encode())
    assert parsed.keys[data["sha256"]].admin


def test_policy_show_summarizes(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text(policy_toml(version=7))
    code, out = run("policy", "show", str(p), "--json")
    assert code == 0 and json.loads(out)["version"] == 7
    assert "mock-model" in json.loads(out)["models"]


def test_plugins_lists_and_flags_missing(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text(policy_toml(pipeline=["definitely-missing"]))
    code, out = run("plugins", "--policy", str(p), "--json")
    assert code == 4
    assert json.loads(out)["missing"] == ["definitely-missing"]
    code, out = run("plugins", "--policy", str(p))
    assert code == 4 and "not installed" in out


@pytest.mark.parametrize("args", [["serve"], ["policy", "verify"], ["key", "new"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    code, _ = run(*args)
    assert code == 2
