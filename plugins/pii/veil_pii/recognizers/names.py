"""Person names beyond what the small NER model finds.

The small spaCy model misses names it has rarely seen (``Szabina J
Gelencsér``), names in lower case (``naomi ryan``), lone given names
(``Irenka is very reliable``) and names in lists, letters and dialogue. This
recognizer combines four signals, each general rather than tied to a
phrasing:

- a gazetteer of given and family names of many countries (``data/``, built
  from Faker's locales; see ``tools/build_name_lists.py``);
- the shape of a name: a run of capitalised words, initials and particles
  (``van``, ``de``, ``ten``) on one line;
- cue phrases before it (``my name is``, ``call me``, ``Dear``, ``Mrs.``,
  ``shouted at``) and layouts around it (``Ubul: ...`` dialogue lines, a
  line that holds a name alone, ``Name: ...`` fields);
- the NER model's own PERSON/ORG spans, which confirm gazetteer hits.

A name found once is then found everywhere in the text, alone or in part
(``Aantje Mourik`` ... ``everyone calls me Aantje``).
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult
from spacy.lang.en.stop_words import STOP_WORDS

from .tokens import Token, tokenize, words

__all__ = [
    "PARTICLES",
    "TITLES",
    "VeilNameRecognizer",
    "could_be_a_name",
    "english_word_test",
    "english_words",
    "family_names",
    "given_names",
    "looks_like_code",
]

PARTICLES = words(
    """
    van von de der den ten ter da di del della dos du la le el al bin ibn af zu y
    """
)
TITLES = words(
    """
    mr mrs ms miss mx dr prof sir madam madame mme mlle herr frau sr sra
    """
)

# Common English words that are also given names: on their own they need
# more evidence than a capital letter (a cue, a second name word, NER).
AMBIGUOUS = words(
    """
    will may can june april august march mark bill grant rose hope faith grace joy art
    rich sunny summer winter autumn page park long young king black white brown green
    gray grey bell hill wood stone rock river dawn eve ray jack frank earnest chase guy
    pat sue sky star amber ruby pearl jade crystal ivy holly daisy lily iris violet
    hazel angel baby honey lucky major max miles penny robin sandy mason hunter carter
    baker cook walker fisher archer price cash bond love happy rain storm harmony melody
    precious blessing gift god lord prince princess duke earl queen bishop dean sterling
    royal noble justice liberty journey destiny trinity genesis unique golden silver
    gold ace abbey alpha beta author bird blaze bliss blossom boss brand brook brooks
    case christian church clay cliff cole cotton crane cross dale day dell dick don drew
    field fleming ford fox free glen glenn gordon hall hart heath herb hunt jean lane
    lee lincoln little lotus luck marsh moon morning nick north oak ocean paris pierce
    pike poppy power read reed rocky rod rush sage saint salt scott sharp shell sky snow
    spring stern street strong sweet tab tan tea temple todd tom tony trust valentine
    wade wall ward warren wells west whit wolf worth wren york phone email address
    mobile fax desk date name user assistant note website office personal info street
    road avenue suite apt unit box city state country zip code monday tuesday wednesday
    thursday friday saturday sunday january february july september october november
    december today tomorrow yesterday
    """
)

# Words and phrases that announce a name right after them (case-insensitive,
# matched on tokens: one set lookup per token instead of a regex per run).
_STRONG_CUES = frozenset(
    {
        "my name is", "name is", "name :", "call me", "calls me", "called", "named", "dear",
        "hi", "hello", "hey", "i am", "i'm", "i’m", "sincerely", "regards", "thanks",
        "cheers", "attn", "attn :", "signed",
    }
)  # fmt: skip
_STRONG_LAST = frozenset(cue.rsplit(" ", 1)[-1] for cue in _STRONG_CUES)
_WEAK_CUES = words(
    """
    by with from to for at and or told asked married meet met saw see visit ask contact
    email cc add remove kid son daughter wife husband child mother father brother sister
    friend colleague boss manager producer director patient client customer employee
    doctor nurse teacher founder founders him her mr mrs ms miss dr prof ,
    """
)
_NEVER_ALONE = words(
    """
    will may can june april august march summer winter autumn spring morning hope faith
    grace joy love happy lucky major king queen prince princess god lord bishop dean
    justice liberty phone email address mobile fax desk date name user assistant note
    website office personal info street road avenue suite apt unit box city state
    country zip code monday tuesday wednesday thursday friday saturday sunday january
    february july september october november december today tomorrow yesterday hi hello
    hey dear thanks cheers regards
    """
)
_CONTRACTION = re.compile(r"(?i)^(?:i|you|we|they|he|she|it|let|that|there|what)['’]")
_SENTENCE_END = frozenset(".!?\n:;\"“”'")


def _load(name: str) -> frozenset[str]:
    data = resources.files("veil_pii").joinpath("data").joinpath(name).read_bytes()
    return frozenset(gzip.decompress(data).decode("utf-8").casefold().split("\n"))


@cache
def given_names() -> frozenset[str]:
    """Case-folded given names (about 27,000, many countries)."""
    return _load("given_names.txt.gz")


@cache
def family_names() -> frozenset[str]:
    """Case-folded family names (about 28,000, many countries)."""
    return _load("family_names.txt.gz")


@cache
def english_words(model: str) -> frozenset[str]:
    """English words (WordNet's, from the spaCy model's lemmatizer tables):
    a capitalised word that is none of them is a proper noun."""
    import spacy
    from spacy.lookups import Lookups

    root = spacy.util.get_package_path(model)
    found = sorted(root.glob("*/lemmatizer/lookups")) or sorted(root.glob("lemmatizer/lookups"))
    if not found:
        return frozenset()
    lookups = Lookups()
    lookups.from_disk(found[0])
    words: set[str] = set()
    index = lookups.get_table("lemma_index")
    exceptions = lookups.get_table("lemma_exc")
    for pos in ("noun", "verb", "adj", "adv"):
        words.update(index.get(pos, ()))
        words.update(exceptions.get(pos, {}).keys())
    return frozenset(w for w in words if "_" not in w)


_SUFFIXES = ("ies", "es", "s", "ed", "d", "ing", "ly", "er", "est", "'s", "’s")


def english_word_test(lexicon: frozenset[str]) -> Callable[[str], bool]:
    """A cached test: is this case-folded word English (in ``lexicon``, a
    stop word, or an inflection of a lexicon word: ``users``, ``killed``)?"""

    @lru_cache(maxsize=100_000)
    def english(folded: str) -> bool:
        return (
            folded in lexicon
            or folded in STOP_WORDS
            or any(
                folded.endswith(suffix) and folded[: -len(suffix)] in lexicon
                for suffix in _SUFFIXES
            )
        )

    return english


def could_be_a_name(lexicon: frozenset[str]) -> Callable[[str], bool]:
    """A test for words that may be (part of) a person's name in cased text:
    capitalised (``Zoe``, ``McDonald``; in all capitals only when it is a
    known name: ``ZOE`` but not ``HTTP``), not a stop word, and either a
    known given or family name or not an English word (``Kaczmarek``, but
    not ``Users``)."""
    names = given_names() | family_names()
    english = english_word_test(lexicon)

    def test(word: str) -> bool:
        if not word[0].isupper():
            return False
        folded = word.casefold()
        if folded in STOP_WORDS or folded in _NEVER_ALONE:
            return False  # "Sunday", "Street": with a name next to it, that one counts
        if folded in names:
            return True
        return not word.isupper() and not english(folded)

    return test


_NAME_PREFIXES = re.compile(r"^(?:Mc|Mac|De|Di|Da|Du|La|Le|Van|Von|Fitz|O['’])[A-Z]")


def looks_like_code(text: str, start: int, end: int) -> bool:
    """Is ``text[start:end]`` an identifier or an acronym rather than a name?

    CamelCase inside the word (``BaseModel``; ``McDonald`` is a name), all
    capitals (``README``, ``JSON``), digits or code punctuation glued to it
    (``Ed25519``, `` `Redis` ``, ``sha256``, ``Starlette(``, ``os.path``).
    """
    word = text[start:end]
    if len(word) > 1 and word.isupper():
        return True
    camel = any(c.isupper() for c in word[1:]) and any(c.islower() for c in word)
    if camel and not _NAME_PREFIXES.match(word) and "-" not in word:
        return True
    before = text[start - 1] if start else " "
    after = text[end] if end < len(text) else " "
    if before in "`_/\\<=$#@" or after in "`_(=/\\<>[{0123456789":
        return True
    return after == "." and end + 1 < len(text) and (text[end + 1].isalnum())


_VERB_AFTER = words(
    """
    is was has had have will would said says began begins shouted told asked wrote
    writes lives lived works worked went came comes called calls joined left died
    married met spoke speaks explained thinks thought wants wanted needs needed likes
    liked loves loved knows knew can could should might must may did does and
    """
)


class VeilNameRecognizer(EntityRecognizer):
    """Finds ``PERSON`` spans with the signals described in the module doc."""

    name: str  # set by EntityRecognizer.__init__

    def __init__(
        self, supported_language: str = "en", lexicon: frozenset[str] = frozenset()
    ) -> None:
        self.lexicon = lexicon
        self._english = english_word_test(lexicon)
        super().__init__(
            supported_entities=["PERSON"],
            name="VeilNameRecognizer",
            supported_language=supported_language,
        )

    def load(self) -> None:
        """Load the gazetteers now rather than on the first call."""
        given_names()
        family_names()

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None
    ) -> list[RecognizerResult]:
        """``PERSON`` results for ``text`` (empty unless ``PERSON`` is asked for)."""
        if "PERSON" not in entities:
            return []
        tokens = tokenize(text)
        ner = _ner_spans(nlp_artifacts, len(text))
        caseless = not any(c.isupper() for c in text)
        found: dict[tuple[int, int], float] = {}
        runs = list(_name_runs(tokens))
        cues = _cues(tokens)
        for run in runs:
            score = self._score(text, tokens, run, ner, caseless, cues)
            if score > 0:
                key = (_title_start(tokens, run[0]), tokens[run[-1]].end)
                found[key] = max(found.get(key, 0.0), score)
        for key, score in _lines_with_a_name_alone(text, tokens):
            found[key] = max(found.get(key, 0.0), score)
        seeds = dict(found)
        for span in ner.get("PERSON") or ():
            seeds.setdefault(span, 0.85)
        for key in _coordinated(text, tokens, runs, seeds, caseless):
            found.setdefault(key, 0.6)
        for key, score in _repeats(text, tokens, [k for k, s in found.items() if s >= 0.5], ner):
            found.setdefault(key, score)
        return [self._result(start, end, score) for (start, end), score in found.items()]

    def _result(self, start: int, end: int, score: float) -> RecognizerResult:
        explanation = AnalysisExplanation(
            recognizer=self.name, original_score=score, textual_explanation="name heuristics"
        )
        return RecognizerResult("PERSON", start, end, score, analysis_explanation=explanation)

    def _score(
        self,
        text: str,
        tokens: Sequence[Token],
        run: Sequence[int],
        ner: dict[str, _Coverage],
        caseless: bool,
        cues: tuple[frozenset[int], frozenset[int]],
    ) -> float:
        first = tokens[run[0]]
        if not first.is_capitalized and not caseless and first.start not in cues[0]:
            before = tokens[run[0] - 1] if run[0] else None
            if before is not None and not before.is_newline and before.text != ">":
                return 0.0  # lower case in cased text: only after a cue or as a speaker
        words = [tokens[i] for i in run if tokens[i].is_word and len(tokens[i].text) > 1]
        if not words:
            return 0.0
        given, family = given_names(), family_names()
        folded = [w.text.casefold() for w in words]
        n_given = sum(f in given and f not in STOP_WORDS for f in folded)
        n_family = sum(f in family and f not in STOP_WORDS for f in folded)
        unambiguous = [f for f in folded if f not in AMBIGUOUS and f not in STOP_WORDS]
        start, end = tokens[run[0]].start, tokens[run[-1]].end
        strong = start in cues[0]
        weak = start in cues[1]
        title = _after_title(tokens, run[0])
        capitalized = all(tokens[i].is_capitalized for i in run if tokens[i].is_word)
        dialogue = _dialogue_speaker(text, tokens, run)
        in_ner_person = _overlaps(ner.get("PERSON"), start, end)
        in_ner_other = _overlaps(ner.get("ORGANIZATION"), start, end) or _overlaps(
            ner.get("LOCATION"), start, end
        )
        initial = run[0] == 0 or tokens[run[0] - 1].text in _SENTENCE_END
        proper = [f for f in folded if not self._english(f)]
        nxt = tokens[run[-1] + 1].text.casefold() if run[-1] + 1 < len(tokens) else ""
        verb_after = nxt in _VERB_AFTER
        in_gpe = _overlaps(ner.get("LOCATION"), start, end)

        if caseless and not capitalized:
            # Text written without capitals: names are the gazetteer words
            # that are not English words (nor code: sha256, os.path).
            if any(looks_like_code(text, w.start, w.end) for w in words):
                return 0.0
            if all(f in given or f in family or len(f) == 1 for f in folded) and proper:
                return 0.8 if strong or dialogue or len(words) >= 2 else 0.6
            if (strong or dialogue) and len(words) <= 3 and proper:
                return 0.7
            return 0.0
        if not capitalized:
            # Lower-case names need a name-announcing cue or a dialogue layout,
            # and every word must be a known name.
            if (strong or dialogue) and n_given + n_family >= len(words) and unambiguous:
                return 0.75
            return 0.0
        if len(words) >= 2:
            if n_given and (n_given + n_family >= 2 or len(unambiguous) == len(words)):
                return 0.85
            if (n_given or n_family) and (strong or title or in_ner_person or in_ner_other):
                return 0.8
            if (strong or title) and unambiguous:
                return 0.7
            if len(proper) == len(words) and not in_gpe:
                return 0.7  # "Ravil G Yefimov": no English word in it
            return 0.0
        # A single capitalised word.
        word = folded[0]
        if looks_like_code(text, words[0].start, words[0].end) and not (strong or title):
            return 0.0
        known = word in given or word in family
        if not known or word in STOP_WORDS:
            if word in STOP_WORDS or word in AMBIGUOUS or word in _NEVER_ALONE:
                return 0.0
            if strong or title or dialogue:
                return 0.75
            if not proper or in_gpe:
                return 0.0
            if verb_after or weak or in_ner_person:
                return 0.6
            tagged_otherwise = any(
                spans.overlaps(start, end) for label, spans in ner.items() if label != "PERSON"
            )
            return 0.0 if initial or tagged_otherwise else 0.5
        if strong or title or dialogue:
            return 0.8
        if in_gpe:
            # The small model tags many foreign given names as places; a given
            # name that is not also an English word is still a name.
            return 0.55 if word in given and word not in AMBIGUOUS else 0.0
        if word in AMBIGUOUS or (self._english(word) and word not in given):
            if word in _NEVER_ALONE:
                return 0.0
            return 0.6 if in_ner_person else 0.55 if (verb_after or weak) else 0.0
        if in_ner_person or weak or verb_after:
            return 0.7
        if word in given:
            return 0.5 if initial else 0.6
        return 0.0 if initial else 0.45


def _cues(tokens: Sequence[Token]) -> tuple[frozenset[int], frozenset[int]]:
    """Start offsets of the tokens right after a strong and after a weak cue
    (a trailing ``,`` ``:`` or ``.`` of the cue and line breaks may sit between)."""
    strong: set[int] = set()
    weak: set[int] = set()
    previous: list[str] = []  # folded words and punctuation before, newest last
    for tok in tokens:
        if tok.is_newline:
            continue
        if previous:
            tail = previous[-3:]
            while tail and tail[-1] in {",", "."}:
                tail = tail[:-1]
            if (
                tail
                and tail[-1] in _STRONG_LAST
                and any(" ".join(tail[k:]) in _STRONG_CUES for k in range(len(tail)))
            ):
                strong.add(tok.start)
            elif (
                previous[-1] in _WEAK_CUES
                or (tail and tail[-1] in _WEAK_CUES)
                or (previous[-1] == ":" and len(previous) > 1 and previous[-2] in _WEAK_CUES)
            ):
                weak.add(tok.start)
        previous.append(tok.folded)
        if len(previous) > 4:
            del previous[0]
    return frozenset(strong), frozenset(weak)


def _coordinated(
    text: str,
    tokens: Sequence[Token],
    runs: Sequence[Sequence[int]],
    found: dict[tuple[int, int], float],
    caseless: bool,
) -> Iterable[tuple[int, int]]:
    """Runs listed with a found name (``Monjeau, Graves and Reed``)."""
    spans = [(tokens[r[0]].start, tokens[r[-1]].end) for r in runs]
    named = _Coverage(len(text))
    for (a, b), score in found.items():
        if score >= 0.5:
            named.add(a, b)
    names = {span for span in spans if named.overlaps(*span)}
    changed = True
    while changed:
        changed = False
        for left, right in zip(spans, spans[1:], strict=False):
            between = text[left[1] : right[0]].strip().casefold()
            if between not in {",", "and", ", and", "or", "&", "und", "et", "y"}:
                continue
            for this, other in ((left, right), (right, left)):
                if this in names and other not in names:
                    word = text[other[0] : other[1]]
                    if (word[0].isupper() or caseless) and word.casefold() not in STOP_WORDS:
                        names.add(other)
                        changed = True
                        yield other


def _name_runs(tokens: Sequence[Token]) -> Iterable[list[int]]:
    """Index runs of name-shaped tokens on one line: capitalised words,
    initials (``J``, ``J.``), particles between them; lower-case words are
    runs of their own (cues decide on them)."""
    i, n = 0, len(tokens)
    while i < n:
        tok = tokens[i]
        if not tok.is_word or _not_a_name_word(tok.text):
            i += 1
            continue
        run = [i]
        lower = not tok.is_capitalized
        j = i + 1
        while j < n and len(run) < 5:
            t = tokens[j]
            gap = tokens[j - 1].end != t.start
            if t.text == "." and len(tokens[j - 1].text) == 1 and not gap:
                run.append(j)  # an initial's dot: "H."
                j += 1
                continue
            if not t.is_word or not gap or "\n" in _between(tokens, j) or _not_a_name_word(t.text):
                break
            if lower:
                folded = t.text.casefold()
                if t.is_capitalized or not (folded in given_names() or folded in family_names()):
                    break
            elif not t.is_capitalized and t.text.casefold() not in PARTICLES:
                break
            run.append(j)
            j += 1
        while run and tokens[run[-1]].text.casefold() in PARTICLES | {"."}:
            if tokens[run[-1]].text == "." and len(run) > 1:
                break
            run.pop()
        if run:
            yield run
        i = max(j, i + 1)


_GREETINGS = frozenset(
    ["hi", "hello", "hey", "dear", "thanks", "thank", "cheers", "regards", "sincerely"]
)


def _not_a_name_word(word: str) -> bool:
    folded = word.casefold()
    if folded in _GREETINGS or _CONTRACTION.match(word):
        return True
    return folded in STOP_WORDS and folded not in PARTICLES


def _between(tokens: Sequence[Token], j: int) -> str:
    return "" if j == 0 else ("\n" if tokens[j - 1].is_newline else "")


def _title_start(tokens: Sequence[Token], i: int) -> int:
    """Where the name starting at token ``i`` starts, its title included
    (``Mrs. Kathrine Filemonsen``)."""
    k = i - 1
    if k >= 0 and tokens[k].text == ".":
        k -= 1
    if k >= 0 and tokens[k].text.casefold() in TITLES:
        return tokens[k].start
    return tokens[i].start


def _after_title(tokens: Sequence[Token], i: int) -> bool:
    k = i - 1
    if k >= 0 and tokens[k].text == ".":
        k -= 1
    return k >= 0 and tokens[k].text.casefold() in TITLES


def _dialogue_speaker(text: str, tokens: Sequence[Token], run: Sequence[int]) -> bool:
    """``Name:`` at the start of a line, followed by speech."""
    first, last = run[0], run[-1]
    at_line_start = first == 0 or tokens[first - 1].is_newline or tokens[first - 1].text == ">"
    nxt = tokens[last + 1] if last + 1 < len(tokens) else None
    return at_line_start and nxt is not None and nxt.text == ":" and len(run) <= 3


def _lines_with_a_name_alone(
    text: str, tokens: Sequence[Token]
) -> Iterable[tuple[tuple[int, int], float]]:
    """A line holding only 2-4 words, each a known name or an initial, at
    least one a given name (signatures, address blocks, ``naomi ryan``)."""
    given, family = given_names(), family_names()
    line: list[Token] = []
    for tok in [*tokens, Token("\n", len(text), len(text))]:
        if not tok.is_newline:
            line.append(tok)
            continue
        words = [t for t in line if t.text not in {">", "-", "*", "."}]
        if 2 <= len(words) <= 4 and all(t.is_word for t in words):
            folded = [t.text.casefold() for t in words]
            names = [f for f in folded if (f in given or f in family) and f not in STOP_WORDS]
            initials = [f for f in folded if len(f) == 1]
            if (
                any(f in given for f in folded)
                and not any(f in _NEVER_ALONE for f in folded)
                and len(names) + len(initials) == len(words)
                and any(f not in AMBIGUOUS for f in names)
            ):
                yield (words[0].start, words[-1].end), 0.7
        line = []


def _repeats(
    text: str,
    tokens: Sequence[Token],
    spans: Sequence[tuple[int, int]],
    ner: dict[str, _Coverage],
) -> Iterable[tuple[tuple[int, int], float]]:
    """Every other occurrence of a found name, or of one of its words."""
    parts: set[str] = set()
    for start, end in spans:
        for tok in tokenize(text[start:end]):
            folded = tok.text.casefold()
            if (
                tok.is_word
                and len(folded) > 2
                and folded not in STOP_WORDS | AMBIGUOUS | _NEVER_ALONE
            ):
                parts.add(folded)
    if not parts:
        return
    for tok in tokens:
        if tok.is_word and tok.text.casefold() in parts:
            yield (tok.start, tok.end), 0.6


class _Coverage:
    """Which characters of a text some spans cover: overlap tests in C."""

    __slots__ = ("_covered", "spans")

    def __init__(self, length: int) -> None:
        self._covered = bytearray(length)
        self.spans: list[tuple[int, int]] = []

    def add(self, start: int, end: int) -> None:
        self._covered[start:end] = b"\x01" * (end - start)
        self.spans.append((start, end))

    def overlaps(self, start: int, end: int) -> bool:
        return self._covered.find(1, start, end) != -1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.spans)


def _ner_spans(nlp_artifacts: Any, length: int) -> dict[str, _Coverage]:
    """The NER model's spans by label, labels as Presidio maps them
    (``PERSON``, ``LOCATION`` for GPE/LOC/FAC, ``ORGANIZATION``, ...)."""
    out: dict[str, _Coverage] = {}
    for ent in getattr(nlp_artifacts, "entities", None) or ():
        coverage = out.get(ent.label_)
        if coverage is None:
            coverage = out[ent.label_] = _Coverage(length)
        coverage.add(ent.start_char, ent.end_char)
    return out


def _overlaps(spans: _Coverage | None, start: int, end: int) -> bool:
    return spans is not None and spans.overlaps(start, end)
