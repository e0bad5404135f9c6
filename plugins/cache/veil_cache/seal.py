"""Encryption at rest for what the Redis store keeps: AES-256-GCM.

Each value is sealed with a fresh 96-bit nonce and the Redis key name as
associated data, so a value copied under another key (another team's) does
not open. The key comes from an environment variable the policy names, never
from the policy.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["BadKey", "SealBroken", "Sealer", "load_key"]


class BadKey(ValueError):
    """The encryption key is missing or malformed (the message says how to fix it)."""


class SealBroken(ValueError):
    """A value does not open with this key (another key, or tampered)."""


def load_key(env: str) -> bytes:
    """The 32-byte key in environment variable ``env`` (base64 or hex).

    :raises BadKey: unset or not 32 bytes.
    """
    raw = os.environ.get(env, "").strip()
    if not raw:
        raise BadKey(
            f'[cache] store = "redis" encrypts entries: set ${env} to a 32-byte key in '
            "base64 (`veil cache keygen` prints one), the same on every replica"
        )
    key: bytes | None = None
    if len(raw) == 64:
        try:
            key = bytes.fromhex(raw)
        except ValueError:
            key = None
    if key is None:
        try:
            key = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            key = None
    if key is None or len(key) != 32:
        raise BadKey(
            f"${env} must hold 32 bytes in base64 (44 characters) or hex (64); "
            "`veil cache keygen` prints one"
        )
    return key


class Sealer:
    """Seal and open values bound to a name."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, name: bytes, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, plaintext, name)

    def open(self, name: bytes, sealed: bytes) -> bytes:
        """:raises SealBroken: wrong key, wrong name, or altered bytes."""
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], name)
        except (InvalidTag, ValueError):
            raise SealBroken("a cache entry does not open with this key") from None
