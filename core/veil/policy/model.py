"""The policy document: its schema, and its compiled, request-ready form.

A policy is TOML. The core validates the sections it owns (``[policy]``,
``[gateway]``, ``[plugins.*]``, ``[[teams]]``, ``[[keys]]``,
``[[deployments]]``); every other top-level section belongs to a plugin the
policy names and is validated by that plugin.
"""

from __future__ import annotations

import hashlib
import tomllib
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import PolicyError
from ..types import Deployment, Principal

__all__ = ["CORE_SECTIONS", "Policy", "PolicyDocument", "parse_policy"]

CORE_SECTIONS = frozenset({"policy", "gateway", "plugins", "teams", "keys", "deployments"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyMeta(_Strict):
    version: Annotated[int, Field(ge=1)]
    issuer: Annotated[str, Field(min_length=1)]
    audience: Annotated[str, Field(min_length=1)]
    issued_at: datetime
    expires_at: datetime

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("needs a time zone, e.g. 2026-11-28T00:00:00Z")
        return v


class GatewaySection(_Strict):
    pipeline: list[str] = []
    max_body_bytes: Annotated[int, Field(gt=0)] = 4_000_000
    retry_backoff_ms: Annotated[int, Field(ge=0)] = 200
    max_retry_after_s: Annotated[float, Field(ge=0)] = 10.0
    default_stage_timeout_ms: Annotated[int, Field(gt=0)] = 2000

    @field_validator("pipeline")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a plugin twice")
        return v


class PluginEntry(_Strict):
    distribution: str | None = None
    version: str | None = None
    fail: Literal["closed", "open"] = "closed"
    timeout_ms: Annotated[int, Field(gt=0)] | None = None

    @field_validator("version")
    @classmethod
    def _spec(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                SpecifierSet(v)
            except InvalidSpecifier as e:
                raise ValueError(f"not a version range: {v!r} (e.g. '>=0.1,<0.2')") from e
        return v


class TeamEntry(_Strict):
    id: Annotated[str, Field(min_length=1)]
    name: str | None = None


class KeyEntry(_Strict):
    id: Annotated[str, Field(min_length=1)]
    team: Annotated[str, Field(min_length=1)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    admin: bool = False
    tags: list[str] = []


class DeploymentEntry(_Strict):
    name: Annotated[str, Field(min_length=1)]
    provider: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    api_base: str | None = None
    api_key_env: str | None = None
    input_per_mtok: Annotated[float, Field(ge=0)] = 0.0
    output_per_mtok: Annotated[float, Field(ge=0)] = 0.0
    cached_input_per_mtok: Annotated[float, Field(ge=0)] | None = None
    context_window: Annotated[int, Field(gt=0)] | None = None
    teams: list[str] | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 600.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    owned_by: str | None = None
    options: dict[str, Any] = {}


class PolicyDocument(_Strict):
    """The validated TOML document, as written."""

    model_config = ConfigDict(extra="allow", frozen=True)

    policy: PolicyMeta
    gateway: GatewaySection = GatewaySection()
    plugins: dict[str, PluginEntry] = {}
    teams: list[TeamEntry] = []
    keys: list[KeyEntry] = []
    deployments: list[DeploymentEntry] = []


class Policy:
    """A verified policy, compiled once for the request path.

    ``keys`` maps the SHA-256 hex of an API key to its :class:`Principal`;
    ``models`` maps a model name to its deployments in policy order;
    ``sections`` holds the raw plugin sections; ``plugins`` names every
    plugin to load (pipeline order first); ``signed_by`` is the id of the
    trusted key whose signature was verified (``None`` for a policy parsed
    without verification).
    """

    __slots__ = (
        "audience",
        "deployments",
        "digest",
        "document",
        "expires_at",
        "gateway",
        "issued_at",
        "issuer",
        "keys",
        "models",
        "plugin_entries",
        "plugins",
        "raw",
        "sections",
        "signed_by",
        "teams",
        "version",
    )

    def __init__(self, document: PolicyDocument, raw: bytes) -> None:
        self.document = document
        self.raw = raw
        self.digest = hashlib.sha256(raw).hexdigest()
        self.signed_by: str | None = None
        meta = document.policy
        self.version = meta.version
        self.issuer = meta.issuer
        self.audience = meta.audience
        self.issued_at = meta.issued_at
        self.expires_at = meta.expires_at
        self.gateway = document.gateway
        self.teams = {t.id: t for t in document.teams}
        self.plugin_entries = dict(document.plugins)
        names = list(document.gateway.pipeline)
        names += [n for n in document.plugins if n not in names]
        self.plugins: tuple[str, ...] = tuple(names)
        self.sections: dict[str, Any] = dict(document.model_extra or {})
        self.keys: dict[str, Principal] = {}
        for k in document.keys:
            if k.team not in self.teams:
                raise PolicyError(f"key {k.id!r} names team {k.team!r}, which [[teams]] lacks")
            if k.sha256 in self.keys:
                raise PolicyError(f"key {k.id!r}: the same key hash appears twice")
            self.keys[k.sha256] = Principal(k.id, k.team, frozenset(k.tags), k.admin)
        self.deployments: list[Deployment] = []
        self.models: dict[str, list[Deployment]] = {}
        for d in document.deployments:
            for t in d.teams or ():
                if t not in self.teams:
                    raise PolicyError(
                        f"deployment {d.name!r} names team {t!r}, which [[teams]] lacks"
                    )
            dep = Deployment(
                name=d.name,
                provider=d.provider,
                model=d.model,
                api_base=d.api_base.rstrip("/") if d.api_base else None,
                api_key_env=d.api_key_env,
                input_per_mtok=d.input_per_mtok,
                output_per_mtok=d.output_per_mtok,
                cached_input_per_mtok=d.cached_input_per_mtok,
                context_window=d.context_window,
                teams=frozenset(d.teams) if d.teams is not None else None,
                timeout_s=d.timeout_s,
                connect_timeout_s=d.connect_timeout_s,
                max_retries=d.max_retries,
                extra={"owned_by": d.owned_by or d.provider, **d.options},
            )
            self.deployments.append(dep)
            self.models.setdefault(d.name, []).append(dep)
        for section in self.sections:
            if section not in self.plugins:
                raise PolicyError(
                    f"section [{section}] belongs to no plugin the policy names; "
                    f"add {section!r} to [gateway] pipeline or [plugins.{section}], "
                    "or fix the section's name"
                )

    def is_current(self, now: datetime | None = None) -> bool:
        """True when ``issued_at <= now < expires_at``."""
        now = now or datetime.now(UTC)
        return self.issued_at <= now < self.expires_at

    def plugin_entry(self, name: str) -> PluginEntry:
        """The ``[plugins.<name>]`` entry, or the defaults."""
        return self.plugin_entries.get(name) or PluginEntry()

    def deployments_for(self, model: str, team: str) -> list[Deployment] | None:
        """Deployments of ``model`` that ``team`` may use; ``None`` if the model
        is unknown, ``[]`` if known but forbidden to the team."""
        deps = self.models.get(model)
        if deps is None:
            return None
        return [d for d in deps if d.allows(team)]


def parse_policy(raw: bytes, *, source: str = "policy") -> Policy:
    """Parse and validate policy bytes (the signature is checked elsewhere).

    :raises PolicyError: naming the first problem and where it is.
    """
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PolicyError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: not valid TOML: {e}") from None
    if "policy" not in data:
        raise PolicyError(f"{source}: lacks the [policy] section (version, issuer, audience, ...)")
    try:
        doc = PolicyDocument.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5]
        )
        raise PolicyError(f"{source}: invalid policy: {problems}") from None
    return Policy(doc, raw)
