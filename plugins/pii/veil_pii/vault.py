"""Conversation vaults: placeholder tables that outlive a call, sealed.

With ``x-veil-conversation``, the placeholders of a conversation persist
across its calls, so ``Zoe Young`` is ``<PERSON_1>`` in turn 1 and in turn 7,
on any replica. A vault keeps, per (team, conversation), a *record*: a flat
map of fields, the same in memory and in Redis (one hash per conversation)::

    key      prefix + HMAC(team NUL conversation)
    v:<vid>  -> "<TYPE_N>"               vid = HMAC(value_key(type, value)), hex
    p:<TYPE_N> -> vid || AES-GCM(value)  the value, sealed (see below)
    n:<TYPE> -> last number given to TYPE

Guarantees:

- **Nothing in clear.** Values are sealed with AES-GCM (:class:`Sealer`);
  conversation ids and value identities appear only as keyed HMACs (a plain
  hash of a phone number can be brute-forced, an HMAC without the key
  cannot). Values are in clear only transiently, while a call builds its
  :class:`~veil_pii.placeholders.PlaceholderMap`.
- **Scoped to the team.** The record's name and every sealed value's
  associated data include the team: another team using the same
  conversation id reaches a different, empty record, and a record copied
  under another team's (or conversation's) name does not open there. (The
  ``team`` the stage passes is the caller's scope, its team and API key:
  :func:`veil_pii.stage.conversation_scope`.)
- **Consistent.** :meth:`Vault.assign` is atomic: concurrent calls of one
  conversation, on one replica or many, never give one placeholder to two
  values nor two placeholders to one value; numbers of a type are 1..k.
- **Expiring.** A record expires ``ttl_s`` after its last use (assign or load).
- **Fail closed.** A storage error (Redis unreachable) propagates; a record
  that does not authenticate raises :class:`TamperedRecord`. Neither is
  turned into an empty table.

Associated data (AAD) of a sealed value: ``team, conversation, vid`` — not
the placeholder. In Redis the number is decided inside the Lua script, which
cannot encrypt, and the value is sealed before the script runs so the whole
assignment is one round trip. Binding the blob to ``vid`` instead is as
strong where it matters: on reading, the value must open under this team,
conversation and vid, must hash back to ``vid`` under the placeholder's type,
and ``v:<vid>`` must name that same placeholder. A blob moved to another
team, conversation, type or placeholder fails. What someone able to write to
Redis (but without the key) can still do is relabel a conversation's own
values consistently (swap both the ``p:`` and ``v:`` fields of two values of
one type), delete a record, or roll it back to an older state of itself;
none of these discloses anything, and the last two are possible against any
storage the attacker can write. Keep Redis private all the same.

:class:`MemoryVault` serves one process; :class:`RedisVault` is shared by
replicas, which must share the key (:func:`load_key`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.errors import VeilError

from .placeholders import (
    ENTITY_TYPE,
    PlaceholderMap,
    format_placeholder,
    parse_placeholder,
    value_key,
)

__all__ = [
    "KEY_BYTES",
    "MemoryVault",
    "RedisVault",
    "Sealer",
    "TamperedRecord",
    "Vault",
    "build_vault",
    "load_key",
]

KEY_BYTES = 32
"""Length of the vault key (AES-256)."""

_NONCE = 12
_VID = 64  # hex HMAC-SHA256
_AAD_LABEL = b"veil-pii/vault/v1"

_GENERATE = 'python -c "import os,base64;print(base64.b64encode(os.urandom(32)).decode())"'


class TamperedRecord(VeilError):
    """A stored conversation record failed authentication: altered in storage,
    copied from another team or conversation, or sealed with another key."""


class Sealer:
    """AES-GCM sealing and HMAC naming with one 32-byte key.

    Two independent sub-keys are derived with HKDF-SHA256 (labels
    ``veil-pii seal`` and ``veil-pii name``): one seals values, one names
    records and values, so neither use weakens the other. The key itself is
    not kept.

    :raises ValueError: ``key`` is not 32 bytes.
    """

    __slots__ = ("_aead", "_name_key")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the vault key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(_derive(key, b"veil-pii seal v1"))
        self._name_key = _derive(key, b"veil-pii name v1")

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """``nonce (12 random bytes) || ciphertext || tag (16 bytes)``; ``aad``
        is authenticated, not stored: :meth:`open` needs the same."""
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext that :meth:`seal` sealed with the same ``aad``.

        :raises TamperedRecord: ``blob`` was altered, truncated, sealed for
            another ``aad``, or sealed with another key.
        """
        try:
            return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], aad)
        except (InvalidTag, ValueError):
            raise TamperedRecord(
                "a sealed conversation value failed authentication: it was altered in "
                "storage, copied from another team or conversation, or sealed with another "
                "key (every replica must use the same vault key)"
            ) from None

    def digest(self, data: bytes) -> str:
        """HMAC-SHA256 of ``data`` with the naming sub-key, 64 hex digits.
        Deterministic for one key; unguessable without it."""
        return hmac.new(self._name_key, data, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "Sealer(<key hidden>)"


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label).derive(key)


class Vault(Protocol):
    """Where conversation tables live. Tables are per ``(team, conversation)``."""

    async def assign(
        self, team: str, conversation: str, items: Sequence[tuple[str, str]]
    ) -> PlaceholderMap:
        """Give every ``(entity_type, value)`` of ``items`` a placeholder and
        return the conversation's whole table (old and new placeholders).

        A value whose :func:`~veil_pii.placeholders.value_key` is already in
        the table keeps its placeholder (and the table its first form); a new
        one gets the next number of its type, as
        :meth:`PlaceholderMap.assign` would. Atomic, also across replicas.
        Refreshes the time to live. With ``items`` empty, same as :meth:`load`.

        :raises ValueError: an entity type is not ``[A-Z][A-Z0-9_]*``, or
            ``team`` contains NUL.
        :raises TamperedRecord: the stored record does not authenticate.
        :raises Exception: the storage's own errors (e.g. Redis unreachable),
            unchanged.
        """
        ...

    async def load(self, team: str, conversation: str) -> PlaceholderMap:
        """The conversation's table, empty when unknown or expired; refreshes
        the time to live of a known one. Raises as :meth:`assign`."""
        ...

    async def close(self) -> None:
        """Release connections (and, for memory, forget every table)."""
        ...


# -- the record format, shared by both vaults -------------------------------------


def _record_name(sealer: Sealer, team: str, conversation: str) -> str:
    if "\x00" in team:
        raise ValueError("a team id cannot contain NUL")
    return sealer.digest(f"{team}\x00{conversation}".encode())


def _aad(team: str, conversation: str, vid: str) -> bytes:
    # team has no NUL and vid is fixed-length: the encoding is unambiguous
    return b"\x00".join((_AAD_LABEL, team.encode(), conversation.encode(), vid.encode()))


@dataclass(frozen=True, slots=True)
class _Prepared:
    """``items`` of one assign, deduplicated by identity, values sealed."""

    vid: str
    entity_type: str
    record: bytes  # vid || sealed value


def _prepare(
    sealer: Sealer, team: str, conversation: str, items: Sequence[tuple[str, str]]
) -> list[_Prepared]:
    seen: set[str] = set()
    out: list[_Prepared] = []
    for entity_type, value in items:
        if not ENTITY_TYPE.fullmatch(entity_type):
            raise ValueError(f"not an entity type: {entity_type!r}")
        vid = sealer.digest(value_key(entity_type, value).encode())
        if vid in seen:
            continue  # the first form in the call wins, as in PlaceholderMap
        seen.add(vid)
        blob = sealer.seal(value.encode(), _aad(team, conversation, vid))
        out.append(_Prepared(vid, entity_type, vid.encode() + blob))
    return out


def _table(
    sealer: Sealer, team: str, conversation: str, fields: Mapping[str, bytes]
) -> PlaceholderMap:
    """Open a record's ``p:`` fields into a table, checking each against its
    identity and the ``v:`` index.

    :raises TamperedRecord: a value does not open, or does not belong where it is.
    """
    table = PlaceholderMap()
    for name, record in fields.items():
        if not name.startswith("p:"):
            continue
        placeholder = name[2:]
        parsed = parse_placeholder(placeholder)
        vid = record[:_VID].decode("ascii", "replace")
        if parsed is None or fields.get("v:" + vid) != placeholder.encode():
            raise TamperedRecord(
                "a conversation record is inconsistent (a value is not under the "
                "placeholder its index names): it was altered in storage"
            )
        value = sealer.open(record[_VID:], _aad(team, conversation, vid)).decode()
        if not hmac.compare_digest(sealer.digest(value_key(parsed[0], value).encode()), vid):
            raise TamperedRecord(
                "a conversation record is inconsistent (a value was moved to a "
                "placeholder of another type): it was altered in storage"
            )
        table.add(placeholder, value)
    return table


# -- memory ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Record:
    expires: float
    fields: dict[str, bytes] = field(default_factory=dict)


class MemoryVault:
    """A vault in this process's memory (one replica; tables die with it).

    Records hold the same sealed fields as in Redis. A record expires
    ``ttl_s`` after its last use; beyond ``max_conversations`` the least
    recently used go first. Operations never await, so each is atomic on
    the event loop (use one vault from one event loop).

    :param clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        sealer: Sealer,
        ttl_s: float,
        max_conversations: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_conversations <= 0:
            raise ValueError("ttl_s and max_conversations must be positive")
        self.sealer = sealer
        self.ttl_s = ttl_s
        self.max_conversations = max_conversations
        self.clock = clock
        # least recently used first; as every record lives ttl_s after its
        # last use, that is also the order in which they expire
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def __len__(self) -> int:
        """Conversations held (expired ones included until swept)."""
        return len(self._records)

    def _sweep(self, now: float) -> None:
        while self._records:
            oldest = next(iter(self._records.values()))
            if oldest.expires > now:
                break
            self._records.popitem(last=False)

    def _touch(self, name: str, *, create: bool) -> _Record | None:
        now = self.clock()
        self._sweep(now)
        record = self._records.get(name)
        if record is None:
            if not create:
                return None
            record = self._records[name] = _Record(now)
            while len(self._records) > self.max_conversations:
                self._records.popitem(last=False)
        self._records.move_to_end(name)
        record.expires = now + self.ttl_s
        return record

    async def assign(
        self, team: str, conversation: str, items: Sequence[tuple[str, str]]
    ) -> PlaceholderMap:
        """See :meth:`Vault.assign`."""
        name = _record_name(self.sealer, team, conversation)
        prepared = _prepare(self.sealer, team, conversation, items)
        record = self._touch(name, create=bool(prepared))
        if record is None:
            return PlaceholderMap()
        fields = record.fields
        for item in prepared:  # the same steps as the Lua script of RedisVault
            if "v:" + item.vid in fields:
                continue
            counter = "n:" + item.entity_type
            number = int(fields.get(counter, b"0")) + 1
            placeholder = format_placeholder(item.entity_type, number)
            fields[counter] = str(number).encode()
            fields["v:" + item.vid] = placeholder.encode()
            fields["p:" + placeholder] = item.record
        return _table(self.sealer, team, conversation, fields)

    async def load(self, team: str, conversation: str) -> PlaceholderMap:
        """See :meth:`Vault.load`."""
        return await self.assign(team, conversation, ())

    async def close(self) -> None:
        """Forget every table."""
        self._records.clear()


# -- Redis ----------------------------------------------------------------------------

# KEYS[1]: the conversation's hash. ARGV[1]: time to live in ms; then triples
# (vid, entity type, vid || sealed value). Numbers the values the hash does
# not know yet, refreshes the time to live (if the hash exists) and returns
# the whole hash. Idempotent: running it twice (a client retry) changes nothing.
_ASSIGN_LUA = """
local key = KEYS[1]
for i = 2, #ARGV, 3 do
  local vfield = 'v:' .. ARGV[i]
  if redis.call('HEXISTS', key, vfield) == 0 then
    local kind = ARGV[i + 1]
    local n = redis.call('HINCRBY', key, 'n:' .. kind, 1)
    local placeholder = '<' .. kind .. '_' .. n .. '>'
    redis.call('HSET', key, vfield, placeholder, 'p:' .. placeholder, ARGV[i + 2])
  end
end
redis.call('PEXPIRE', key, ARGV[1])
return redis.call('HGETALL', key)
"""


_KEYCHECK = b"veil-pii vault key check"


class RedisVault:
    """A vault in Redis, shared by replicas (see the module doc for the layout).

    Every operation is one round trip: one Lua script (registered once,
    run with ``EVALSHA``) that assigns, refreshes the time to live and
    returns the hash, so it is atomic across replicas. Redis errors
    propagate unchanged.

    :param url: ``redis://`` or ``rediss://`` URL.
    :param timeout_s: connect and socket timeout, so a hung Redis fails the
        call instead of hanging it.
    """

    def __init__(
        self,
        url: str,
        sealer: Sealer,
        ttl_s: float,
        prefix: str = "veil:pii:",
        *,
        timeout_s: float = 5.0,
    ) -> None:
        import redis.asyncio as redis

        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.sealer = sealer
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.prefix = prefix
        self.client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._script = self.client.register_script(_ASSIGN_LUA)
        self._key_checked = False

    async def check_key(self) -> None:
        """Make sure every replica seals with the same key: the first one
        stores a sealed marker (``<prefix>keycheck``), the others open it.
        Conversation records are named with the key, so without this a
        replica with another key would find every conversation empty,
        silently.

        :raises TamperedRecord: the store was written with another key.
        :raises redis.exceptions.RedisError: Redis cannot be reached.
        """
        name = self.prefix + "keycheck"
        await self.client.set(name, self.sealer.seal(_KEYCHECK, _KEYCHECK), nx=True)
        marker = await self.client.get(name)
        try:
            if not isinstance(marker, bytes) or self.sealer.open(marker, _KEYCHECK) != _KEYCHECK:
                raise TamperedRecord("the vault's key marker is missing or altered")
        except TamperedRecord:
            raise TamperedRecord(
                f"the conversation store (keys {self.prefix}*) was written with another "
                "vault key: every replica must use the same [pii.conversations] key"
            ) from None
        self._key_checked = True

    def key(self, team: str, conversation: str) -> str:
        """The Redis key of a conversation's hash."""
        return self.prefix + _record_name(self.sealer, team, conversation)

    async def assign(
        self, team: str, conversation: str, items: Sequence[tuple[str, str]]
    ) -> PlaceholderMap:
        """See :meth:`Vault.assign`; checks the key first (see :meth:`check_key`)
        until that has succeeded once."""
        if not self._key_checked:
            await self.check_key()
        key = self.key(team, conversation)
        args: list[str | bytes | int] = [self.ttl_ms]
        for item in _prepare(self.sealer, team, conversation, items):
            args += [item.vid, item.entity_type, item.record]
        flat: Any = await self._script(keys=[key], args=args)
        fields = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        return _table(self.sealer, team, conversation, fields)

    async def load(self, team: str, conversation: str) -> PlaceholderMap:
        """See :meth:`Vault.load`."""
        return await self.assign(team, conversation, ())

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()


# -- configuration ----------------------------------------------------------------------


def load_key(env_var: str | None, backend: Literal["memory", "redis"]) -> bytes:
    """The 32-byte vault key, base64 (standard or URL-safe, padding optional)
    in the environment variable ``env_var``.

    Unset (or ``env_var`` is ``None``): a random key for ``memory``, whose
    tables die with the process anyway; an error for ``redis``, whose
    replicas must share one key that outlives them.

    :raises ValueError: unset for ``redis``, not base64, or not 32 bytes.
        The message says how to fix it and never contains the variable's value.
    """
    raw = os.environ.get(env_var) if env_var else None
    var = env_var or "VEIL_PII_KEY"
    fix = f"generate one with  {_GENERATE}  and set {var} to it on every replica"
    if raw is None or not raw.strip():
        if backend == "memory":
            return os.urandom(KEY_BYTES)
        raise ValueError(
            f"the redis conversation store needs a {KEY_BYTES}-byte key in {var}, "
            f"which is not set; {fix}"
        )
    text = raw.strip().replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{var} is not valid base64; {fix}") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{var} must hold {KEY_BYTES} bytes, it holds {len(key)}; {fix}")
    return key


def build_vault(
    backend: Literal["memory", "redis"],
    *,
    key: bytes,
    ttl_s: float,
    redis_url: str | None = None,
    max_conversations: int = 10_000,
    prefix: str = "veil:pii:",
) -> Vault:
    """The vault the settings ask for.

    :param max_conversations: ``memory`` only (Redis evicts by its own policy).
    :param prefix: ``redis`` only: the keys' prefix.
    :raises ValueError: a bad key, ``redis`` without ``redis_url``, or an
        unknown backend.
    """
    sealer = Sealer(key)
    if backend == "memory":
        return MemoryVault(sealer, ttl_s, max_conversations)
    if backend == "redis":
        if not redis_url:
            raise ValueError(
                "the redis conversation store needs a Redis URL (redis://host:port/db)"
            )
        return RedisVault(redis_url, sealer, ttl_s, prefix)
    raise ValueError(f"unknown conversation store {backend!r}: use 'memory' or 'redis'")
