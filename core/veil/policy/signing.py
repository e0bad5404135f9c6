"""Ed25519 keys and detached signatures over the exact bytes of a policy file.

A signature file (``POLICY.sig``) is one JSON object::

    {"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}

``key_id`` is the first 16 hex digits of the SHA-256 of the raw public key;
it only picks which trusted key to try, it grants nothing.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import PolicyError

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "TrustedKeys",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "sign_file",
    "signature_path",
    "verify_bytes",
]

PRIVATE_KEY_NAME = "veil-policy.key"
PUBLIC_KEY_NAME = "veil-policy.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short identifier of a public key (16 hex digits)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signature_path(policy_path: Path) -> Path:
    """Where the detached signature of ``policy_path`` lives."""
    return policy_path.with_name(policy_path.name + ".sig")


def generate_keypair(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into ``out_dir`` (private key mode 0600).

    :returns: (private key path, public key path)
    :raises FileExistsError: when a key is already there and not ``overwrite``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise FileExistsError(str(priv_path if priv_path.exists() else pub_path))
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PEM (PKCS#8) Ed25519 private key.

    :raises PolicyError: when the file is missing or not such a key.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PolicyError(
            f"no private key at {path}; create one with `veil policy keygen`"
        ) from None
    except (ValueError, TypeError) as e:
        raise PolicyError(f"{path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PolicyError(f"{path} is not an Ed25519 key")
    return key


def sign_file(policy_path: Path, private_key: Ed25519PrivateKey) -> Path:
    """Sign the exact bytes of ``policy_path``; write and return ``POLICY.sig``."""
    data = policy_path.read_bytes()
    sig = private_key.sign(data)
    out = signature_path(policy_path)
    out.write_bytes(
        orjson.dumps(
            {
                "alg": "ed25519",
                "key_id": key_id(private_key.public_key()),
                "signature": base64.b64encode(sig).decode(),
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
    )
    return out


class TrustedKeys:
    """The set of public keys the gateway trusts (several at once for rotation).

    Keys come from the command line or the environment, never from a policy.
    """

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id(k): k for k in keys}

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path]) -> TrustedKeys:
        """Load PEM public keys from files, or every ``*.pub`` file in a directory.

        :raises PolicyError: when a path is missing or holds no Ed25519 key.
        """
        keys: list[Ed25519PublicKey] = []
        for p in map(Path, paths):
            files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
            if p.is_dir() and not files:
                raise PolicyError(f"trusted key directory {p} holds no *.pub file")
            for f in files:
                try:
                    key = serialization.load_pem_public_key(f.read_bytes())
                except FileNotFoundError:
                    raise PolicyError(f"trusted key {f} does not exist") from None
                except ValueError as e:
                    raise PolicyError(f"trusted key {f} is not a PEM public key: {e}") from None
                if not isinstance(key, Ed25519PublicKey):
                    raise PolicyError(f"trusted key {f} is not an Ed25519 public key")
                keys.append(key)
        return cls(keys)

    def verify(self, data: bytes, sig_file: bytes, *, source: str = "policy") -> str:
        """Check a detached signature over ``data``.

        :returns: the id of the key that signed.
        :raises PolicyError: malformed signature file, unknown key, bad signature.
        """
        return verify_bytes(self._keys, data, sig_file, source=source)


def verify_bytes(
    keys: dict[str, Ed25519PublicKey], data: bytes, sig_file: bytes, *, source: str
) -> str:
    if not keys:
        raise PolicyError("no trusted keys: pass --trusted-key PUB (or set VEIL_TRUSTED_KEYS)")
    try:
        doc = orjson.loads(sig_file)
        kid = doc["key_id"]
        sig = base64.b64decode(doc["signature"], validate=True)
        if doc.get("alg") != "ed25519" or not isinstance(kid, str):
            raise ValueError("alg")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise PolicyError(
            f"{source}: the signature file is malformed; re-sign with `veil policy sign`"
        ) from None
    key = keys.get(kid)
    if key is None:
        raise PolicyError(
            f"{source}: signed by key {kid}, which is not trusted (trusted: "
            f"{', '.join(sorted(keys))}); pass its public key with --trusted-key"
        )
    try:
        key.verify(sig, data)
    except InvalidSignature:
        raise PolicyError(
            f"{source}: the signature does not match the file's bytes (tampered, or "
            "edited after signing); re-sign it with `veil policy sign`"
        ) from None
    return kid
