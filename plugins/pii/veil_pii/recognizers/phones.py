"""Phone numbers in international and national formats, validated.

Presidio's phone recognizer only tries a few regions and misses numbers such
as ``+41 (0)96 471 07 95``, ``0490 39 07 81`` or ``(99) 645-791``. Here a
permissive pattern finds phone-shaped digit groups on one line, and each
candidate is scored on evidence:

- with a ``+``/``00`` country prefix that ``phonenumbers`` accepts as a
  possible number: strong;
- after a cue (``phone``, ``mobile``, ``fax``, ``call``, ``reach me at``...)
  or followed by a label (``-Office``, ``(mobile)``): strong;
- a valid number for one of many regions (``phonenumbers``), written in
  groups: medium;
- a classic North-American shape (``(602)272-9781``, ``201-948-1927``): medium.

Dates, times, IP addresses, card numbers (Luhn) and plain amounts are not
phone numbers.
"""

from __future__ import annotations

import re
from typing import Any

import phonenumbers
from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult

__all__ = ["VeilPhoneRecognizer"]

_CANDIDATE = re.compile(
    r"(?<![\w+.\-/])(?:\+|00)?\(?\d[\d \t().\-/]{4,24}\d"
    r"(?:[ \t]*(?:x|ext\.?|extension)[ \t]*\d{1,6})?(?![\w/])"
)
_CUE = re.compile(
    r"(?i)(?:phone|tel|telephone|mobile|cell|fax|desk|office|home|work|call|text|sms|dial"
    r"|whatsapp|reach (?:me|us|her|him) (?:at|on)|contact|answering at|hotline|ph|mob"
    r"|landline)\b[^\n\d]{0,20}$"
)
_LABEL_AFTER = re.compile(r"(?i)^[ \t]*(?:-[ \t]*|\()?(?:office|fax|mobile|cell|home|work|desk)")
_DATE_LIKE = re.compile(
    r"^\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|^\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}$|^\d{1,2}:\d{2}"
)
_DECIMALS = re.compile(r"\d{1,3}\.\d{1,3}(?:[ \t]*[-/][ \t]*\d{1,3}\.\d{1,3})?")
_NANP = re.compile(r"^(?:\+?1[ .\-]?)?\(?\d{3}\)?[ .\-]?\d{3}[ .\-]\d{4}(?:[ \t]*x\d+)?$")
_REGIONS = (
    "US", "GB", "DE", "FR", "IT", "ES", "PT", "NL", "BE", "CH", "AT", "DK", "SE", "NO", "FI",
    "IS", "IE", "PL", "CZ", "SK", "HU", "SI", "HR", "RS", "GR", "CY", "RO", "BG", "EE", "LV",
    "LT", "UA", "RU", "TR", "IL", "IN", "AU", "NZ", "CA", "BR", "AR", "MX", "ZA", "JP", "CN",
)  # fmt: skip


def _luhn(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _valid_somewhere(candidate: str) -> bool:
    for region in _REGIONS:
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return True
    return False


class VeilPhoneRecognizer(EntityRecognizer):
    """``PHONE_NUMBER`` results with the evidence rules of the module doc."""

    name: str  # set by EntityRecognizer.__init__

    def __init__(self, supported_language: str = "en") -> None:
        super().__init__(
            supported_entities=["PHONE_NUMBER"],
            name="VeilPhoneRecognizer",
            supported_language=supported_language,
        )

    def load(self) -> None:
        """Nothing to load: ``phonenumbers`` metadata loads on import."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None
    ) -> list[RecognizerResult]:
        """``PHONE_NUMBER`` results for ``text``."""
        if "PHONE_NUMBER" not in entities:
            return []
        results = []
        for match in _CANDIDATE.finditer(text):
            start, end = match.span()
            candidate = match.group().rstrip(" \t.-/(")
            end = start + len(candidate)
            if candidate.count("(") != candidate.count(")"):
                if candidate.startswith("(") and ")" not in candidate:
                    candidate, start = candidate[1:], start + 1
                elif candidate.endswith(")"):
                    candidate, end = candidate[:-1], end - 1
            score = self._score(text, start, end, candidate)
            if score:
                explanation = AnalysisExplanation(
                    recognizer=self.name, original_score=score, textual_explanation="phone shape"
                )
                results.append(
                    RecognizerResult(
                        "PHONE_NUMBER", start, end, score, analysis_explanation=explanation
                    )
                )
        return results

    @staticmethod
    def _score(text: str, start: int, end: int, candidate: str) -> float:
        main = re.split(r"(?i)[ \t]*(?:x|ext\.?|extension)[ \t]*\d", candidate)[0]
        digits = re.sub(r"\D", "", main)
        if not 6 <= len(digits) <= 15 or _DATE_LIKE.search(candidate):
            return 0.0
        if re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", candidate):  # an IP address
            return 0.0
        if _DECIMALS.fullmatch(candidate):  # 0.43-0.56, 12.5
            return 0.0
        groups = re.findall(r"\d+", main)
        if len(digits) >= 13 and _luhn(digits) and not candidate.startswith(("+", "00")):
            return 0.0  # a card number, for the card recognizer
        cue = bool(_CUE.search(text[max(0, start - 40) : start])) or bool(
            _LABEL_AFTER.match(text[end : end + 12])
        )
        prefixed = candidate.startswith(("+", "00"))
        if prefixed:
            try:
                number = phonenumbers.parse(
                    "+" + candidate.lstrip("+0") if candidate.startswith("00") else candidate, None
                )
                if phonenumbers.is_possible_number(number):
                    return 0.9
            except phonenumbers.NumberParseException:
                pass
        if cue and len(digits) >= 6:
            return 0.85
        if "/" in candidate:
            return 0.0  # 400/404/422: with a slash, only a cue makes it a number to call
        if len(digits) < 7:
            return 0.0
        if _NANP.match(candidate):
            return 0.7
        if len(groups) >= 2 and all(len(g) >= 2 for g in groups[1:]) and _valid_somewhere(main):
            return 0.6
        if len(groups) == 1 and 9 <= len(digits) <= 12 and _valid_somewhere(main):
            return 0.4
        return 0.0
