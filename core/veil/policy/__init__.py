"""Signed policies: schema, signatures, verification."""

from __future__ import annotations

from .loader import RollbackGuard, load_policy
from .model import Policy, parse_policy
from .signing import TrustedKeys, generate_keypair, load_private_key, sign_file

__all__ = [
    "Policy",
    "RollbackGuard",
    "TrustedKeys",
    "generate_keypair",
    "load_policy",
    "load_private_key",
    "parse_policy",
    "sign_file",
]
