"""Verify a policy file end to end: signature, validity window, audience, and
the rollback rule, which persists the highest version accepted so that a
restart cannot go back."""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import orjson

from ..errors import PolicyError
from .model import Policy, parse_policy
from .signing import TrustedKeys, signature_path

__all__ = ["RollbackGuard", "load_policy"]


class RollbackGuard:
    """Remembers, per audience, the highest policy version accepted and the
    digest of its bytes, in ``<state_dir>/policy-state.json``.

    A lower version is refused; the same version with different bytes is
    refused too (a changed policy must carry a higher version).
    """

    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / "policy-state.json" if state_dir else None
        self._memory: dict[str, dict[str, object]] = {}

    def _read(self) -> dict[str, dict[str, object]]:
        if self.path is None:
            return self._memory
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except orjson.JSONDecodeError as e:
            raise PolicyError(
                f"the policy state file {self.path} is corrupt ({e}); restore it from backup "
                "or, knowingly, delete it (this resets rollback protection)"
            ) from None
        return data if isinstance(data, dict) else {}

    def check(self, policy: Policy, source: str) -> None:
        """:raises PolicyError: when ``policy`` would roll back."""
        seen = self._read().get(policy.audience)
        if not seen:
            return
        version = int(seen.get("version", 0))  # type: ignore[call-overload]
        if policy.version < version:
            raise PolicyError(
                f"{source}: version {policy.version} is lower than version {version}, already "
                "accepted (rollback refused); sign a policy with a higher version"
            )
        if policy.version == version and seen.get("sha256") != policy.digest:
            raise PolicyError(
                f"{source}: version {version} was already accepted with different content; "
                "a changed policy needs a higher version"
            )

    def record(self, policy: Policy) -> None:
        """Persist ``policy`` as the highest accepted for its audience (atomic)."""
        data = self._read()
        seen = data.get(policy.audience) or {}
        if int(seen.get("version", 0)) > policy.version:  # type: ignore[call-overload]
            return
        data[policy.audience] = {
            "version": policy.version,
            "sha256": policy.digest,
            "issuer": policy.issuer,
            "accepted_at": datetime.now(UTC).isoformat(),
        }
        if self.path is None:
            self._memory = data
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".policy-state.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_policy(
    path: Path,
    trusted: TrustedKeys,
    *,
    audience: str | None,
    guard: RollbackGuard | None = None,
    now: datetime | None = None,
) -> Policy:
    """Read, verify and parse the policy at ``path`` (signature at ``path.sig``).

    Checks, in order: signature by a trusted key over the exact bytes, valid
    TOML and schema, audience, ``issued_at <= now < expires_at``, rollback.
    The returned policy's ``signed_by`` names the key that signed it.
    Does not record the version: call ``guard.record(policy)`` once the policy
    is actually in force.

    :raises PolicyError: naming the check that failed and how to fix it.
    """
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"{source}: no such policy file") from None
    try:
        sig = signature_path(path).read_bytes()
    except FileNotFoundError:
        raise PolicyError(
            f"{source}: unsigned (no {signature_path(path).name} beside it); sign it with "
            "`veil policy sign POLICY --key PRIVATE_KEY`"
        ) from None
    signed_by = trusted.verify(raw, sig, source=source)
    policy = parse_policy(raw, source=source)
    policy.signed_by = signed_by
    if audience is not None and policy.audience != audience:
        raise PolicyError(
            f"{source}: written for audience {policy.audience!r}, but this gateway serves "
            f"{audience!r}"
        )
    now = now or datetime.now(UTC)
    if now < policy.issued_at:
        raise PolicyError(f"{source}: not valid before {policy.issued_at.isoformat()}")
    if now >= policy.expires_at:
        raise PolicyError(
            f"{source}: expired at {policy.expires_at.isoformat()}; sign a renewed policy"
        )
    if guard is not None:
        guard.check(policy, source)
    return policy
