"""Text to sparse features: hashed word unigrams and bigrams plus a few shape tokens.

The same code runs at training and at decision time, so a prompt always maps to
the same feature ids. Hashing (CRC-32 of the UTF-8 bytes, stable across
processes and platforms) keeps the artifact free of a vocabulary; the router
stores weights only for the buckets seen in training. Works on bytes: one
encode per prompt, no per-token encode (about 3x faster than on ``str``).
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

# ASCII words and numbers; any other non-space byte (punctuation, maths signs,
# each byte of a non-ASCII character) is a token of its own.
_WORD = re.compile(rb"[a-z0-9]+|[^\sa-z0-9]")
# Few-shot prompts repeat the same examples; the last block is the question asked.
_LAST_BLOCK = re.compile(rb"\n\s*\n")
_MATH = frozenset(b"=+*/^<>")
MAX_CHARS = 8000


def _bucket(n: int) -> int:
    """0, 1, 2, ... for 0, 1-2, 3-6, 7-14, ... (log2 buckets)."""
    return (n + 1).bit_length() - 1


def feature_tokens(prompt: str, *, max_chars: int = MAX_CHARS) -> list[bytes]:
    """Feature tokens of a prompt: words and bigrams of the whole text (capped at
    ``max_chars``, head and tail kept), words of its last paragraph prefixed with
    ``L:``, and shape tokens (length, digits, lines, blocks, maths and code signs)."""
    if len(prompt) > max_chars:
        half = max_chars // 2
        prompt = prompt[:half] + "\n" + prompt[-half:]
    text = prompt.lower().encode("utf-8", "replace")
    words = _WORD.findall(text)
    out = list(words)
    out.extend([a + b" " + b for a, b in zip(words, words[1:], strict=False)])
    blocks = _LAST_BLOCK.split(text.strip())
    if len(blocks) > 1:
        out.extend([b"L:" + w for w in _WORD.findall(blocks[-1])])
    digits = sum(text.count(d) for d in b"0123456789")
    out.append(b"#len%d" % _bucket(len(words)))
    out.append(b"#digits%d" % _bucket(digits))
    out.append(b"#lines%d" % _bucket(text.count(b"\n")))
    out.append(b"#blocks%d" % _bucket(len(blocks)))
    if not _MATH.isdisjoint(text):
        out.append(b"#math")
    if b"def " in text or b"return " in text or b"```" in text:
        out.append(b"#code")
    return out


def hashed_ids(prompt: str, n_bits: int) -> list[int]:
    """The prompt's feature tokens hashed into ``2**n_bits`` buckets (with repeats)."""
    mask = (1 << n_bits) - 1
    crc = zlib.crc32
    return [crc(t) & mask for t in feature_tokens(prompt)]


def hashed_counts(prompt: str, n_bits: int) -> dict[int, int]:
    """Bucket id -> how many of the prompt's feature tokens fall in it."""
    return dict(Counter(hashed_ids(prompt, n_bits)))
