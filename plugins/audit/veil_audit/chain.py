"""Sealing records into an authenticated hash chain, and checking one.

A sealed record is one JSON line::

    {"seq":41,"prev":"<mac of record 40>", ...the record's fields..., "mac":"<hex>"}

``mac`` is HMAC-SHA256, under the gateway's audit key, of every byte of the
line before ``,"mac":"``. Because each record carries the previous record's
``mac`` as ``prev`` (the first record of a chain carries :data:`GENESIS`),
editing, deleting, inserting or reordering records breaks either a MAC or a
link, and nobody without the key can re-seal the chain after an edit.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

__all__ = [
    "GENESIS",
    "MIN_KEY_BYTES",
    "Chain",
    "KeyMissing",
    "Mac",
    "Opened",
    "Unsealed",
    "key_id",
    "load_key",
    "open_line",
]

GENESIS = "0" * 64
"""The ``prev`` of a chain's first record."""
MIN_KEY_BYTES = 16
_MAC = b',"mac":"'
_TAIL = len(_MAC) + 64 + 2  # ,"mac":"<64 hex>"}


class KeyMissing(ValueError):
    """The HMAC key's environment variable is unset or too short."""


def load_key(env_name: str, env: Mapping[str, str] | None = None) -> bytes:
    """The audit key from ``env_name`` (UTF-8 bytes of its value).

    :raises KeyMissing: unset, or shorter than :data:`MIN_KEY_BYTES` bytes;
        the message says how to make one.
    """
    value = (os.environ if env is None else env).get(env_name, "")
    key = value.encode()
    if len(key) < MIN_KEY_BYTES:
        problem = "is not set" if not key else f"holds {len(key)} bytes"
        raise KeyMissing(
            f"${env_name} {problem}; the audit trail needs an HMAC key of at least "
            f"{MIN_KEY_BYTES} bytes there, e.g. `export {env_name}=$(openssl rand -hex 32)` "
            "(keep it: `veil audit verify` needs the same key)"
        )
    return key


def key_id(key: bytes) -> str:
    """A short public id of ``key`` (recorded when a file is opened, so that
    a verifier holding the wrong key is told so)."""
    return hashlib.sha256(b"veil-audit-key-id:" + key).hexdigest()[:16]


class Mac:
    """HMAC-SHA256 under one key (RFC 2104), with the key's inner and outer
    pads hashed once: per message it costs two hash copies, about half of
    :func:`hmac.digest`, which looks the digest up on every call. Equal to
    ``hmac.new(key, msg, hashlib.sha256).hexdigest()`` (a test checks it)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def hex(self, message: bytes) -> str:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


class Chain:
    """The writing end: seals record bodies in order. Not thread-safe: one
    writer thread owns it."""

    __slots__ = ("mac", "prev", "seq")

    def __init__(self, key: bytes, seq: int = 0, prev: str = GENESIS) -> None:
        self.mac = Mac(key)
        self.seq = seq
        self.prev = prev

    def seal(self, body: bytes) -> bytes:
        """The sealed line (ending in a newline) of ``body``, the compact JSON
        of a non-empty object, as the next record of the chain."""
        if len(body) < 3 or body[0] != 0x7B or body[-1] != 0x7D:
            raise ValueError("a record body is the JSON of a non-empty object")
        signed = b'{"seq":%d,"prev":"%s",%s' % (self.seq, self.prev.encode(), body[1:-1])
        mac = self.mac.hex(signed)
        self.seq += 1
        self.prev = mac
        return b'%s,"mac":"%s"}\n' % (signed, mac.encode())

    def state(self) -> tuple[int, str]:
        """``(next seq, prev)``: to roll back after a failed write."""
        return self.seq, self.prev

    def restore(self, state: tuple[int, str]) -> None:
        self.seq, self.prev = state


class Unsealed(ValueError):
    """A line that is not a sealed record (damaged, or not JSON)."""


@dataclass(frozen=True, slots=True)
class Opened:
    """A sealed line, parsed: its chain fields, whether its MAC is right
    under the key, and the parsed record."""

    seq: int
    prev: str
    mac: str
    authentic: bool
    record: dict[str, object]


def open_line(line: bytes, mac: Mac) -> Opened:
    """Parse and authenticate one line (without its newline).

    :raises Unsealed: not JSON, or no ``seq``/``prev``/``mac`` where a sealed
        record has them.
    """
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise Unsealed("not a JSON object") from None
    if not isinstance(record, dict):
        raise Unsealed("not a JSON object")
    seq, prev, given = record.get("seq"), record.get("prev"), record.get("mac")
    at = len(line) - _TAIL
    if (
        not isinstance(seq, int)
        or not isinstance(prev, str)
        or not isinstance(given, str)
        or at < 0
        or line[at : at + len(_MAC)] != _MAC
        or not line.endswith(b'"}')
    ):
        raise Unsealed("lacks the seq, prev and mac of a sealed record")
    want = mac.hex(line[:at])
    return Opened(seq, prev, given, hmac.compare_digest(want, given), record)
