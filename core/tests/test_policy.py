"""Signed policies: what is accepted and what is refused, and why."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from veil.errors import PolicyError
from veil.policy import RollbackGuard, TrustedKeys, generate_keypair, load_policy, parse_policy
from veil.policy.signing import signature_path
from veil.testing import PolicyKit, policy_toml


def _load(kit: PolicyKit, path: Path, audience: str | None = "test", **kw: object) -> object:
    return load_policy(path, TrustedKeys.from_paths([kit.public_key_path]), audience=audience, **kw)


def test_signed_policy_is_accepted(policy_kit: PolicyKit) -> None:
    p = _load(policy_kit, policy_kit.write(policy_toml(version=3)))
    assert p.version == 3 and p.audience == "test"


def test_a_verified_policy_names_the_key_that_signed_it(policy_kit: PolicyKit) -> None:
    from veil.policy.signing import key_id, load_private_key

    p = _load(policy_kit, policy_kit.write(policy_toml()))
    assert p.signed_by == key_id(load_private_key(policy_kit.private_key_path).public_key())
    assert parse_policy(policy_toml().encode()).signed_by is None


def test_unsigned_policy_is_refused(policy_kit: PolicyKit) -> None:
    path = policy_kit.write(policy_toml(), sign=False)
    with pytest.raises(PolicyError, match="unsigned"):
        _load(policy_kit, path)


@pytest.mark.parametrize("offset", [0, 10, -2])
def test_a_tampered_byte_is_refused(policy_kit: PolicyKit, offset: int) -> None:
    path = policy_kit.write(policy_toml())
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PolicyError, match="does not match the file's bytes"):
        _load(policy_kit, path)


def test_appending_a_section_after_signing_is_refused(policy_kit: PolicyKit) -> None:
    path = policy_kit.write(policy_toml())
    path.write_bytes(
        path.read_bytes() + b'\n[[keys]]\nid="evil"\nteam="test"\nsha256="' + b"0" * 64 + b'"\n'
    )
    with pytest.raises(PolicyError, match="does not match"):
        _load(policy_kit, path)


def test_policy_signed_by_an_untrusted_key_is_refused(
    policy_kit: PolicyKit, tmp_path: Path
) -> None:
    path = policy_kit.write(policy_toml())
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(PolicyError, match="not trusted"):
        load_policy(path, TrustedKeys.from_paths([other_pub]), audience="test")


def test_several_trusted_keys_allow_rotation(policy_kit: PolicyKit, tmp_path: Path) -> None:
    path = policy_kit.write(policy_toml())
    _, other_pub = generate_keypair(tmp_path / "other")
    keys = TrustedKeys.from_paths([other_pub, policy_kit.keys_dir])
    assert len(keys) == 2
    assert load_policy(path, keys, audience="test").version == 1


def test_malformed_signature_file_is_refused(policy_kit: PolicyKit) -> None:
    path = policy_kit.write(policy_toml())
    signature_path(path).write_text("not a signature")
    with pytest.raises(PolicyError, match="malformed"):
        _load(policy_kit, path)


def test_expired_policy_is_refused(policy_kit: PolicyKit) -> None:
    path = policy_kit.write(policy_toml(expires_at="2021-01-01T00:00:00Z"))
    with pytest.raises(PolicyError, match="expired"):
        _load(policy_kit, path)


def test_not_yet_valid_policy_is_refused(policy_kit: PolicyKit) -> None:
    path = policy_kit.write(policy_toml(issued_at="2098-01-01T00:00:00Z"))
    with pytest.raises(PolicyError, match="not valid before"):
        _load(policy_kit, path)


def test_policy_for_another_audience_is_refused(policy_kit: PolicyKit) -> None:
    path = policy_kit.write(policy_toml(audience="staging"))
    with pytest.raises(PolicyError, match="audience 'staging'.*serves 'production'"):
        _load(policy_kit, path, audience="production")


def test_rollback_is_refused_and_remembered_across_restarts(
    policy_kit: PolicyKit, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    v5 = policy_kit.write(policy_toml(version=5), name="v5.toml")
    v4 = policy_kit.write(policy_toml(version=4), name="v4.toml")
    guard = RollbackGuard(state)
    guard.record(_load(policy_kit, v5, guard=guard))
    # a new guard on the same directory is what a restarted gateway has
    restarted = RollbackGuard(state)
    with pytest.raises(PolicyError, match="version 4 is lower than version 5"):
        _load(policy_kit, v4, guard=restarted)
    assert _load(policy_kit, v5, guard=restarted).version == 5  # same bytes: fine


def test_same_version_with_different_content_is_refused(
    policy_kit: PolicyKit, tmp_path: Path
) -> None:
    guard = RollbackGuard(tmp_path / "state")
    guard.record(
        _load(policy_kit, policy_kit.write(policy_toml(version=2), name="a.toml"), guard=guard)
    )
    changed = policy_kit.write(policy_toml(version=2, extra="# changed\n"), name="b.toml")
    with pytest.raises(PolicyError, match="needs a higher version"):
        _load(policy_kit, changed, guard=guard)


def test_rollback_is_per_audience(policy_kit: PolicyKit, tmp_path: Path) -> None:
    guard = RollbackGuard(tmp_path / "state")
    guard.record(
        _load(policy_kit, policy_kit.write(policy_toml(version=9), name="a.toml"), guard=guard)
    )
    staging = policy_kit.write(policy_toml(version=1, audience="staging"), name="s.toml")
    assert _load(policy_kit, staging, audience="staging", guard=guard).version == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml ][", "not valid TOML"),
        ("[gateway]\npipeline = []\n", "lacks the \\[policy\\] section"),
        (policy_toml().replace("version = 1", 'version = "one"'), "policy.version"),
        (
            policy_toml().replace(
                "issued_at = 2020-01-01T00:00:00Z", "issued_at = 2020-01-01T00:00:00"
            ),
            "time zone",
        ),
        (
            policy_toml(
                deployments=[{"name": "x", "provider": "mock", "model": "m", "teams": ["ghost"]}]
            ),
            "names team 'ghost'",
        ),
        (policy_toml(pipeline=["a", "a"]), "twice"),
        (policy_toml(plugins={"a": {"version": "lots"}}), "not a version range"),
        (policy_toml(gateway={"max_body_bytes": 0}), "max_body_bytes"),
        (policy_toml(gateway={"unknown_knob": 1}), "unknown_knob"),
    ],
)
def test_invalid_policies_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text.encode())


def test_policy_compiles_keys_and_models() -> None:
    p = parse_policy(policy_toml().encode())
    assert {pr.key_id for pr in p.keys.values()} == {"test", "test-admin", "other"}
    assert [d.name for d in p.deployments_for("test-only", "test")] == ["test-only"]
    assert p.deployments_for("test-only", "other") == []
    assert p.deployments_for("nope", "test") is None
    assert p.is_current(datetime(2030, 1, 1, tzinfo=UTC))
