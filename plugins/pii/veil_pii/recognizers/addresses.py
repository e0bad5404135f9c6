"""Street addresses, in one line or as a block of lines, in many countries.

Presidio has no street-address recognizer and the NER model tags pieces of
addresses as numbers, dates or organisations, so about four in five address
spans leak. This recognizer works on tokens in two steps:

1. *Anchors*: a house number next to a street word (``14 Crown Street``,
   ``Harjukuja 54``, ``ul. Słowicza 10``; street words in many languages and
   compound endings such as ``-vej``, ``-katu``, ``-straße``), a unit
   (``Apt. 864``, ``Suite 838``, ``PO Box 12``), military mail
   (``PSC 0413, Box 8144``, ``APO AA 42323``), or any capitalised or numbered
   segment right after an address cue (``address:``, ``located at``,
   ``send it to``, ``corner of``).
2. *Growth*: from an anchor the span grows over what an address continues
   with: house numbers, capitalised words, state codes, postal codes,
   countries, commas, and further short lines of the same block. It stops at
   a lower-case word, a question mark, or a line that does not look like part
   of an address.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult

from .tokens import Token, cue_ends, tokenize, words

__all__ = ["VeilAddressRecognizer"]

STREET_WORDS = words(
    """
    street st str road rd avenue ave av avenida boulevard blvd bd lane ln drive dr court
    ct place pl square sq way terrace ter crescent cres close parkway pkwy highway hwy
    row alley path trail circle cir plaza gardens grove hill heights park walk view isle
    island forks fork extension extensions streets squares parks gateway gateways
    landing meadow meadows mount ridge run station village vista junction knoll loop
    manor mill mission motorway pass passage pike plain port prairie ranch rapids route
    shoal shore spring springs spur stream summit trace track tunnel turnpike valley
    viaduct harbor harbour haven center centre corner corners creek crossing cove canyon
    cape causeway common commons dale divide estate estates expressway falls ferry flat
    flats ford forest freeway glen greens hollow inlet key keys lake lakes lock locks
    lodge mall mews orchard oval ramp river skyway via viale vicolo piazza corso largo
    rue chemin allée impasse quai calle carrera camino paseo rua travessa praça strasse
    straße gasse weg platz allee ring damm ufer chaussee steig pfad markt vej gade gata
    gatan vägen väg vei veien vegen gate katu tie kuja polku tori kaari tér utca út u ul
    ulica aleja plac náměstí nám třída trg cesta ulice laan straat plein gracht kade hof
    singel dreef stræti vegur gränd torg stig bulevar odos leoforos leof dam straeti rúa
    """
)
STREET_ENDINGS = (
    "vej", "vejen", "gade", "gaden", "gata", "gatan", "vägen", "väg", "veien", "vegen",
    "vegur", "stræti", "straße", "strasse", "weg", "gasse", "platz", "allee", "katu", "tie",
    "kuja", "polku", "laan", "straat", "plein", "gracht", "kade", "hove", "singel", "torg",
    "vænget", "vænge", "stien", "bakken", "ulica", "utca", "cesta", "ulice",
)  # fmt: skip
UNITS = words(
    """
    apt apartment suite ste unit flat box pobox room floor fl bldg building psc po
    """
)
MILITARY = frozenset({"apo", "fpo", "dpo"})
_PLAIN_ENGLISH = words(
    """
    pass park way place court view run walk close key keys common commons flat flats mount
    spring springs lake hill square center centre station mill gate ring row path track
    trace loop cove ford forest glen green greens hollow lock locks lodge mall oval ramp
    river shore crossing corner corners creek cape divide estate estates falls ferry
    harbor harbour haven heights island isle junction knoll landing manor meadow meadows
    mission plain port prairie ranch rapids ridge route shoal spur stream summit tunnel
    valley village vista extension extensions fork forks key st dr ct pl sq ter
    """
)
"""Street words that are also everyday English: in lower case after a number
(``404 pass``) they are not a street."""
_CUE = tuple(
    re.compile(rf"(?i)(?:{cue})\s*")
    for cue in (
        r"\baddress(?:es)?(?:\s+(?:is|was))?\s*[:\-]?",
        r"\baddress\b[^.?!\n]{0,40}?\b(?:to|with|is|at)\b",
        r"\b(?:located\s+(?:at|in)|offices?\s+(?:is|are)\s+(?:at|in)|stop\s+at|corner\s+of"
        r"|(?:live|lives|living|stay|staying|reside|resides|moved)\s+(?:at|to|in)"
        r"|here\s+(?:it|they)\s+(?:is|are)\s*:"
        r"|(?:sent|send|ship|shipped|deliver|delivered|return|returned|mail|mailed|post"
        r"|posted|forward|forwarded|bring|drive|take)\b[^.?!\n]{0,30}?\bto)\b",
    )
)
"""Phrases after which an address may follow (three patterns whose matches
may overlap, see :func:`~veil_pii.recognizers.tokens.cue_ends`)."""
_FILLERS = words(
    """
    nan and of de del della delle des la le du da di van na do d r a nad pod u v am an
    im bei sur sous en op aan
    """
)
_LINE_MARKS = frozenset({">", "?", "*", "-", "|", "•"})
"""Quoting and bullet marks that may start the lines of an address block."""
_CORNER = re.compile(r"(?i)\b(?:the\s+)?corner\s+of\s+$")
_STOP_PUNCT = frozenset('?!;"“”:')


def _cap(tok: Token, caseless: bool) -> bool:
    """Capitalised, or any word when the text has no capitals at all."""
    return tok.is_capitalized or (caseless and tok.is_word)


def _is_street(word: str) -> bool:
    folded = word.casefold().rstrip(".")
    return folded in STREET_WORDS or (len(folded) > 5 and folded.endswith(STREET_ENDINGS))


def _addressy(tok: Token, caseless: bool = False) -> bool:
    """May this token be part of an address block once one has started?"""
    if tok.is_number:
        return True
    if tok.is_word:
        folded = tok.text.casefold()
        return _cap(tok, caseless) or folded in UNITS or _is_street(folded) or folded == "nan"
    text = tok.text
    symbol = not text.isascii() and not text.isalnum()  # "∆" in "ΧΑΝ∆ΡΙΑ"
    return text in {",", "-", "/", "#", "(", ")", "."} or symbol


class VeilAddressRecognizer(EntityRecognizer):
    """``STREET_ADDRESS`` results with the anchor-and-growth rules of the module doc."""

    name: str  # set by EntityRecognizer.__init__

    def __init__(self, supported_language: str = "en") -> None:
        super().__init__(
            supported_entities=["STREET_ADDRESS"],
            name="VeilAddressRecognizer",
            supported_language=supported_language,
        )

    def load(self) -> None:
        """Nothing to load."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None
    ) -> list[RecognizerResult]:
        """``STREET_ADDRESS`` results for ``text``."""
        if "STREET_ADDRESS" not in entities:
            return []
        tokens = tokenize(text)
        caseless = not any(c.isupper() for c in text)
        results = []
        covered_until = -1
        anchors = self._anchors(text, tokens, caseless)
        for k, (i, score) in enumerate(anchors):
            if tokens[i].start < covered_until:
                continue
            first = _grow_left(tokens, i, caseless)
            last = _grow_right(tokens, i, caseless)
            start, end = tokens[first].start, tokens[last].end
            ends_with_dot = end < len(text) and text[end] == "." and tokens[last].is_number
            if ends_with_dot and (end + 1 == len(text) or text[end + 1] == "\n"):
                end += 1  # "Király u. 15." ends with its dot
            corner = _CORNER.search(text[max(0, start - 20) : start])
            if corner:
                start -= len(corner.group())
            score = max([score] + [s for j, s in anchors[k:] if tokens[j].start < end])
            covered_until = end
            explanation = AnalysisExplanation(
                recognizer=self.name, original_score=score, textual_explanation="address block"
            )
            results.append(
                RecognizerResult(
                    "STREET_ADDRESS", start, end, score, analysis_explanation=explanation
                )
            )
        return results

    @staticmethod
    def _anchors(text: str, tokens: Sequence[Token], caseless: bool) -> list[tuple[int, float]]:
        anchors: list[tuple[int, float]] = []
        n = len(tokens)
        after_cue = cue_ends(_CUE, text)
        for i, tok in enumerate(tokens):
            folded = tok.text.casefold()
            nxt = tokens[i + 1] if i + 1 < n else None
            nxt2 = tokens[i + 2] if i + 2 < n else None
            if (
                tok.is_word
                and folded in MILITARY
                and nxt
                and nxt.text.upper() in {"AA", "AE", "AP"}
            ):
                anchors.append((i, 0.85))
            elif tok.is_word and folded in UNITS:
                num = nxt2 if nxt and nxt.text in {".", "#"} else nxt
                if (
                    num is not None
                    and num.is_number
                    and _same_line(tokens, i, tokens.index(num, i))
                ):
                    anchors.append((i, 0.55 if _cap(tok, caseless) else 0.45))
            elif tok.is_number and _street_follows(tokens, i, caseless):
                anchors.append((i, 0.8))
            elif tok.is_word and _is_street(tok.text) and _number_near(tokens, i, caseless):
                anchors.append((i, 0.75 if _cap(tok, caseless) or folded in {"u", "ul"} else 0.6))
            elif (tok.is_number or _cap(tok, caseless)) and tok.start in after_cue:
                anchors.append((i, 0.7))
        return anchors


def _same_line(tokens: Sequence[Token], i: int, j: int) -> bool:
    return not any(t.is_newline for t in tokens[i:j])


def _street_follows(tokens: Sequence[Token], i: int, caseless: bool) -> bool:
    """A number followed, on its line, by up to four name words then a
    street word (``14 Crown Street``, ``6750 Koskikatu 25``); an ordinal
    (``3rd``, ``21st``) is not a house number."""
    if i + 1 < len(tokens) and tokens[i + 1].start == tokens[i].end:
        return False
    for j in range(i + 1, min(i + 7, len(tokens))):
        t = tokens[j]
        if t.is_newline or (not t.is_word and not t.is_number and t.text != "."):
            return False
        street = t.is_word and _is_street(t.text)
        plain = t.folded in _PLAIN_ENGLISH and not _cap(t, caseless)
        if street and not plain and (j > i + 1 or len(t.text) > 2):
            return True
        if t.is_word and not _cap(t, caseless) and t.text.casefold() not in _FILLERS:
            return False
    return False


def _number_near(tokens: Sequence[Token], i: int, caseless: bool) -> bool:
    """A house number within three tokens after a street word, on the same line."""
    for j in range(i + 1, min(i + 5, len(tokens))):
        t = tokens[j]
        if t.is_newline:
            return False
        if t.is_number:
            return True
        if t.is_word and not _cap(t, caseless):
            return False
    return False


def _grow_left(tokens: Sequence[Token], i: int, caseless: bool) -> int:
    """Take what precedes the anchor on its line: house numbers and units at
    once; street-name words when a house number precedes them
    (``9721 Dalmatinova 43 Apt. 678``, not ``Mrs. Barbara Yudina Apt. 675``),
    when they start a short line, or, before a street word, up to three of
    them (``Erzsébet tér 19``, ``Rúa do Paseo 46``)."""
    j = i
    k = i
    prefixes = UNITS | {"u", "ul"}
    named = 0
    street_anchor = tokens[i].is_word and _is_street(tokens[i].text)
    while k > 0 and i - k < 8:
        prev = tokens[k - 1]
        if prev.is_newline:
            break
        folded = prev.folded
        if prev.is_number or (prev.is_word and folded in prefixes):
            k -= 1
            j = k
        elif prev.text in {".", "#"} and k >= 2 and tokens[k - 2].folded in prefixes:
            k -= 1
        elif prev.is_word and (
            prev.is_capitalized or folded in _FILLERS or (caseless and street_anchor and named < 1)
        ):
            # real capitals only (but one street name word before a street
            # word): in text without any, walking back would swallow the sentence
            k -= 1
            named += prev.is_word and folded not in _FILLERS
            if street_anchor and named <= 3 and folded not in _FILLERS:
                j = k
        elif prev.text in {".", ","}:
            k -= 1
        elif prev.is_word and len(folded) <= 4 and tokens[k].text == ".":
            k -= 1  # an abbreviation: "rkp.", "str."
        else:
            break
    if k < j and _at_line_start(tokens, k) and _house_line(tokens, k, caseless):
        j = k  # "Fuglie 41 Popović Dam": the whole short line
    if tokens[i].text.casefold() in MILITARY and _at_line_start(tokens, j):
        above = _previous_line_start(tokens, j)
        if above is not None and _short_name_line(tokens, above, caseless):
            return above  # "USNS Bergman" above "FPO AP 93757"
    for _ in range(2):
        if not _at_line_start(tokens, j):
            break
        above = _previous_line_start(tokens, j)
        if above is None or not _house_line(tokens, above, caseless):
            break
        j = above
    return j


def _at_line_start(tokens: Sequence[Token], j: int) -> bool:
    k = j - 1
    while k >= 0 and tokens[k].text in _LINE_MARKS:
        k -= 1
    return k >= 0 and tokens[k].is_newline


def _previous_line_start(tokens: Sequence[Token], j: int) -> int | None:
    """Index of the first token (after line marks) of the line above ``j``'s."""
    k = j - 1
    while k >= 0 and not tokens[k].is_newline:
        k -= 1
    k -= 1  # skip the newline itself
    if k < 0 or tokens[k].is_newline:
        return None  # no line above, or a blank line between
    while k > 0 and not tokens[k - 1].is_newline:
        k -= 1
    while k < j and tokens[k].text in _LINE_MARKS:
        k += 1
    return k


def _short_name_line(tokens: Sequence[Token], k: int, caseless: bool) -> bool:
    """A line of one to three capitalised words (a ship, a unit, a building)."""
    words = []
    while k < len(tokens) and not tokens[k].is_newline:
        words.append(tokens[k])
        k += 1
    return 1 <= len(words) <= 3 and all(t.is_word and _cap(t, caseless) for t in words)


def _house_line(tokens: Sequence[Token], k: int, caseless: bool) -> bool:
    """A line like ``0104 Hafnarstraeti 5`` or ``Fuglie 41 Popović Dam``:
    a house number, capitalised words, no more than six words."""
    words = []
    while k < len(tokens) and not tokens[k].is_newline:
        t = tokens[k]
        if t.is_word or t.is_number:
            words.append(t)
        elif t.text not in {".", ",", "-", "/"}:
            return False
        k += 1
    if not 2 <= len(words) <= 6 or not any(t.is_number for t in words):
        return False
    return all(
        t.is_number or _cap(t, caseless) or t.text.casefold() in _FILLERS | UNITS for t in words
    ) and any(t.is_word for t in words)


def _grow_right(tokens: Sequence[Token], i: int, caseless: bool) -> int:
    """Extend over the rest of the address block; the index of its last token."""
    last = i
    newlines = 0
    j = i + 1
    n = len(tokens)
    while j < n:
        t = tokens[j]
        if t.is_newline:
            newlines += 1
            if newlines > 5 or not _next_line_continues(tokens, j + 1, caseless):
                break
            j += 1
            while j < n and tokens[j].text in _LINE_MARKS:
                j += 1
            continue
        if t.text in _STOP_PUNCT:
            break
        if t.text == ".":
            prev = tokens[j - 1]
            after = tokens[j + 1] if j + 1 < n else None
            abbreviation = prev.is_word and len(prev.text) <= 4
            if not (abbreviation or (after is not None and (after.is_number or after.is_newline))):
                break
            j += 1
            continue
        if t.is_word and not _cap(t, caseless):
            folded = t.text.casefold()
            if folded not in _FILLERS and folded not in UNITS and not _is_street(folded):
                break
            if folded in {"and", "of"} and not (j + 1 < n and _addressy(tokens[j + 1], caseless)):
                break
        elif not _addressy(t, caseless):
            break
        if t.is_word or t.is_number or t.text == ")":
            last = j
        j += 1
    while last > i and tokens[last].is_word and tokens[last].text.casefold() in {"and", "of"}:
        last -= 1
    return last


def _next_line_continues(tokens: Sequence[Token], j: int, caseless: bool) -> bool:
    """Does the line starting at token ``j`` begin like the next line of an
    address (up to where the address would end: ``Cyprus 36903? I am...``)?"""
    while j < len(tokens) and tokens[j].text in _LINE_MARKS:
        j += 1
    words = []
    while j < len(tokens) and not tokens[j].is_newline:
        t = tokens[j]
        if t.text in _STOP_PUNCT or t.text == ":":
            break
        if t.is_word and not (_cap(t, caseless) or t.text.casefold() in _FILLERS | UNITS):
            break
        if t.is_word or t.is_number:
            words.append(t)
        j += 1
    return 0 < len(words) <= 8
