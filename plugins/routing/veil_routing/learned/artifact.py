"""The router artifact file: a small header, JSON metadata and raw arrays.

Layout: ``MAGIC`` (8 bytes), the JSON header's length (4 bytes, little endian),
the JSON header, then each array's bytes at the offset the header gives. No
pickle, nothing executable: loading parses JSON and copies numbers. The policy
pins the whole file's SHA-256, checked before anything in it is parsed.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ArtifactError

MAGIC = b"VEILRTR\x01"
FORMAT = "veil-router"
VERSION = 1
_ALLOWED_DTYPES = {"float16", "float32", "float64", "uint32", "int64"}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode(meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> bytes:
    """Serialize metadata and arrays into artifact bytes."""
    index: dict[str, dict[str, Any]] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        if a.dtype.name not in _ALLOWED_DTYPES:
            raise TypeError(f"array {name!r}: dtype {a.dtype} cannot be stored")
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        index[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "offset": offset}
        blobs.append(data)
        offset += len(data)
    header = json.dumps(
        {"format": FORMAT, "version": VERSION, "meta": meta, "arrays": index},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)


def write(path: str | Path, data: bytes) -> str:
    """Write ``data`` atomically (temp file + rename) and return its SHA-256."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".veilrouter-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a router is not a secret
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def read(
    path: str | Path, sha256: str | None
) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]], str]:
    """Read an artifact; return (meta, arrays, sha256).

    Raises :class:`ArtifactError` when the file cannot be read, when ``sha256``
    is given and differs from the file's, or when the contents are not a router.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(
            f"cannot read router artifact {path}: {e.strerror or e}. "
            "Check the path (relative paths are resolved against the policy file)."
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256.strip().lower():
        raise ArtifactError(
            f"router artifact {path} has sha256 {digest}, but the policy pins {sha256}: "
            "the file was changed or swapped. Put back the artifact the policy names, "
            "or pin the new one's sha256 and re-sign the policy."
        )
    bad = f"{path} is not a veil router artifact (make one with `veil route train`)"
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise ArtifactError(bad)
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + hlen])
    except ValueError:
        raise ArtifactError(bad + ": its header is not valid JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(bad)
    if header.get("version") != VERSION:
        raise ArtifactError(
            f"{path} is router format version {header.get('version')}, this veil reads "
            f"version {VERSION}: retrain it with this version's `veil route train`."
        )
    body = memoryview(data)[start + hlen :]
    arrays: dict[str, npt.NDArray[Any]] = {}
    try:
        for name, spec in header["arrays"].items():
            dtype = np.dtype(spec["dtype"]).newbyteorder("<")
            if spec["dtype"] not in _ALLOWED_DTYPES:
                raise ValueError(spec["dtype"])
            shape = tuple(int(n) for n in spec["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            off = int(spec["offset"])
            end = off + count * dtype.itemsize
            if off < 0 or end > len(body):
                raise ValueError(name)
            arrays[name] = np.frombuffer(body[off:end], dtype=dtype).reshape(shape).copy()
        meta = header["meta"]
        if not isinstance(meta, dict):
            raise ValueError("meta")
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(bad + ": its contents are damaged") from None
    return meta, arrays, digest
