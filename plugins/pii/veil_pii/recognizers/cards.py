"""Payment card numbers of every scheme, validated with the Luhn checksum.

Presidio's card pattern knows a fixed set of issuer prefixes and lengths and
misses 19-digit Visa, 15-digit JCB (``2131``, ``1800``), 12-digit Maestro and
Mir (``2``) numbers. Here any 12 to 19 digits, alone or in groups of 4
(``4111 1111 1111 1111``, ``4111-1111-1111-1111``), that pass Luhn are a
card number; a card cue nearby (``card``, ``cc``, ``visa``...) raises the
score of those that fail it only slightly (typos), never above the threshold
of the default policy.
"""

from __future__ import annotations

import re
from typing import Any

from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult

__all__ = ["VeilCardRecognizer", "luhn"]

_CANDIDATE = re.compile(
    r"(?<![\w.\-])(?:\d{4}[ \-]){2,3}\d{4}(?:[ \-]\d{1,3})?(?![\w\-])"  # in groups of four
    r"|(?<![\w.\-+])\d{12,19}(?![\w\-])"  # or in one run
)
_CUE = re.compile(
    r"(?i)\b(?:card|cc|credit|debit|visa|master ?card|amex|american express|maestro|jcb"
    r"|discover|diners|payment|pay with|charged?)\b"
)


def luhn(digits: str) -> bool:
    """Does ``digits`` pass the Luhn checksum?"""
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class VeilCardRecognizer(EntityRecognizer):
    """``CREDIT_CARD`` results: Luhn-valid 12-19 digit numbers."""

    name: str  # set by EntityRecognizer.__init__

    def __init__(self, supported_language: str = "en") -> None:
        super().__init__(
            supported_entities=["CREDIT_CARD"],
            name="VeilCardRecognizer",
            supported_language=supported_language,
        )

    def load(self) -> None:
        """Nothing to load."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None
    ) -> list[RecognizerResult]:
        """``CREDIT_CARD`` results for ``text``."""
        if "CREDIT_CARD" not in entities:
            return []
        results = []
        for match in _CANDIDATE.finditer(text):
            digits = re.sub(r"\D", "", match.group())
            if not 12 <= len(digits) <= 19 or len(set(digits)) == 1:
                continue
            cue = bool(_CUE.search(text[max(0, match.start() - 40) : match.start()]))
            if luhn(digits):
                score = 1.0 if cue else 0.9
            elif cue:
                score = 0.3
            else:
                continue
            explanation = AnalysisExplanation(
                recognizer=self.name, original_score=score, textual_explanation="Luhn-valid number"
            )
            results.append(
                RecognizerResult(
                    "CREDIT_CARD",
                    match.start(),
                    match.end(),
                    score,
                    analysis_explanation=explanation,
                )
            )
        return results
