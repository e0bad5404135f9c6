"""Text to sparse features: hashed word unigrams and bigrams plus a few shape tokens.

The same code runs at training and at decision time, so a prompt always maps to
the same feature ids. Hashing (CRC-32, stable across processes and platforms)
keeps the artifact free of a vocabulary; the router stores weights only for the
buckets seen in training.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]", re.ASCII)
# Few-shot prompts repeat the same examples; the last block is the question asked.
_LAST_BLOCK = re.compile(r"\n\s*\n")


def _bucket(n: int) -> int:
    """0, 1, 2, ... for 0, 1-2, 3-6, 7-14, ... (log2 buckets)."""
    return (n + 1).bit_length() - 1


def tokens(prompt: str, *, max_chars: int = 8000) -> list[str]:
    """Feature tokens of a prompt: words and bigrams of the whole text (capped at
    ``max_chars``, head and tail kept), words of its last paragraph prefixed with
    ``L:``, and shape tokens (length, digits, lines, maths and code signs)."""
    if len(prompt) > max_chars:
        half = max_chars // 2
        prompt = prompt[:half] + "\n" + prompt[-half:]
    text = prompt.lower()
    words = _WORD.findall(text)
    out = list(words)
    out.extend(a + " " + b for a, b in zip(words, words[1:], strict=False))
    blocks = [b for b in _LAST_BLOCK.split(text.strip()) if b.strip()]
    if len(blocks) > 1:
        out.extend("L:" + w for w in _WORD.findall(blocks[-1]))
    digits = sum(c.isdigit() for c in prompt)
    out.append(f"#len{_bucket(len(words))}")
    out.append(f"#digits{_bucket(digits)}")
    out.append(f"#lines{_bucket(prompt.count(chr(10)))}")
    out.append(f"#blocks{_bucket(len(blocks))}")
    if any(c in prompt for c in "=+*/^<>"):
        out.append("#math")
    if "def " in prompt or "return " in prompt or "```" in prompt:
        out.append("#code")
    return out


def hashed_counts(prompt: str, n_bits: int) -> dict[int, int]:
    """Bucket id -> count of the prompt's feature tokens hashed into ``2**n_bits`` buckets."""
    mask = (1 << n_bits) - 1
    return dict(Counter(zlib.crc32(t.encode()) & mask for t in tokens(prompt)))
