"""Policies (docs/policies.md): manifests in the Kubernetes shape (apiVersion, kind, metadata,
spec), stored one per key in a JetStream KV bucket and watched by every sidecar.

Every pattern is matched exactly as written: nothing is lower-cased, trimmed or resolved, and a
pattern that could be read two ways is refused here, at validation, rather than guessed at when a
call is decided.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from agentmesh.models._base import AGENT_NAME_RE, CAPABILITY_NAME_RE, Wire

__all__ = [
    "POLICY_API_VERSION",
    "AccessPolicy",
    "AccessPolicySpec",
    "AccessRule",
    "Balance",
    "BreakerSettings",
    "Policy",
    "PolicyChange",
    "PolicyKind",
    "PolicyMetadata",
    "PolicyRevision",
    "PolicySet",
    "RetrySettings",
    "SourceSelector",
    "TargetSelector",
    "TrafficPolicy",
    "TrafficPolicySpec",
    "TrafficSubset",
]


#: The only manifest version so far.
POLICY_API_VERSION = "agentmesh.dev/v1"
PolicyKind = Literal["AccessPolicy", "TrafficPolicy"]
_POLICY_NAME_RE = AGENT_NAME_RE

#: SPIFFE IDs as the spec allows them: lowercase trust domain, path segments of letters, digits,
#: ``.``, ``-``, ``_``. A pattern may end in ``/*``: any one further segment.
_SPIFFE_RE = re.compile(r"^spiffe://[a-z0-9._-]+(?:/[A-Za-z0-9._-]+)+$")
_SPIFFE_PATTERN_RE = re.compile(r"^spiffe://[a-z0-9._-]+(?:/[A-Za-z0-9._-]+)*/\*$")


def _dns_label(value: str, what: str) -> str:
    if not _POLICY_NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must be lowercase letters, digits and '-', 1-63 characters, "
            "starting and ending with a letter or digit"
        )
    return value


def _check_label_pairs(labels: dict[str, str]) -> dict[str, str]:
    if not labels:
        raise ValueError("labels must not be empty (it would match every caller); omit it")
    for key, value in labels.items():
        if not key or len(key) > 128 or not key.isprintable() or any(c.isspace() for c in key):
            raise ValueError(f"label key {key!r} must be 1-128 printable characters, no spaces")
        if len(value) > 256 or not value.isprintable() or value != value.strip():
            raise ValueError(
                f"label {key}={value!r}: values are matched exactly; no leading or trailing "
                "spaces, at most 256 printable characters"
            )
    return labels


def _check_specifier(value: str) -> str:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not value or value != value.strip():
        raise ValueError(f"version {value!r} must be a PEP 440 specifier without outer spaces")
    if value[0].isdigit():
        try:
            Version(value)
        except InvalidVersion as exc:
            raise ValueError(f"version {value!r} is not a PEP 440 version") from exc
        return value
    if any(not part.strip() for part in value.split(",")):
        raise ValueError(f"version {value!r} has an empty clause")
    try:
        SpecifierSet(value)
    except InvalidSpecifier as exc:
        raise ValueError(f"version {value!r} is not a PEP 440 specifier (e.g. '>=1.0,<2')") from exc
    return value


def _check_tags(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("tags must not be empty (it would match everything); omit it")
    for tag in value:
        if not tag or len(tag) > 64 or not tag.isprintable() or " " in tag:
            raise ValueError(f"tag {tag!r} must be 1-64 printable characters without spaces")
    return value


class PolicyMetadata(Wire):
    """A policy's name (its key in the store) plus free-form description and labels.

    ``revision`` and ``updated`` are filled in by the control plane when it returns a policy
    (the KV revision and its time); they are ignored when a policy is applied.
    """

    name: str = Field(description="DNS label; unique across both kinds")
    description: str = Field(default="", max_length=1024)
    labels: dict[str, str] = Field(default_factory=dict)
    revision: int | None = Field(default=None, description="Read-only: the KV revision")
    updated: datetime | None = Field(default=None, description="Read-only: when it was written")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value, "policy name")


class SourceSelector(Wire):
    """Who a rule is about. Every field given must match (AND); give at least one.

    ``agent``: an exact agent name, or ``*`` for any identified caller. ``spiffe``: an exact
    SPIFFE ID, or one ending in ``/*`` for any single last segment. ``labels``: every pair must
    equal a label of the caller's registry record.
    """

    agent: str | None = None
    spiffe: str | None = None
    labels: dict[str, str] | None = None

    @field_validator("agent")
    @classmethod
    def _agent(cls, value: str | None) -> str | None:
        if value is None or value == "*":
            return value
        return _dns_label(value, "agent")

    @field_validator("spiffe")
    @classmethod
    def _spiffe(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "*" in value:
            if not _SPIFFE_PATTERN_RE.match(value):
                raise ValueError(
                    f"SPIFFE pattern {value!r} must be spiffe://<trust-domain>/<path>/* with a "
                    "lowercase trust domain; '*' may only be the whole last segment"
                )
        elif not _SPIFFE_RE.match(value):
            raise ValueError(
                f"SPIFFE ID {value!r} must look like spiffe://<trust-domain>/agent/<name>: "
                "lowercase trust domain, segments of letters, digits, '.', '-', '_', no empty, "
                "'.' or '..' segment, no trailing '/'"
            )
        if any(seg in (".", "..") for seg in value[len("spiffe://") :].split("/")[1:]):
            raise ValueError(f"SPIFFE ID {value!r}: '.' and '..' segments are not allowed")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else _check_label_pairs(value)

    @model_validator(mode="after")
    def _not_empty(self) -> SourceSelector:
        if self.agent is None and self.spiffe is None and self.labels is None:
            raise ValueError("a source needs agent, spiffe or labels (agent: '*' for anyone)")
        return self


class TargetSelector(Wire):
    """What a rule is about. Every field given must match (AND); give at least one.

    ``capability``: an exact capability name, or ``*``. ``version``: a PEP 440 specifier on the
    capability's version (a bare version means exactly it). ``tags``: all must be present.
    """

    capability: str | None = None
    version: str | None = None
    tags: tuple[str, ...] | None = None

    @field_validator("capability")
    @classmethod
    def _capability(cls, value: str | None) -> str | None:
        if value is None or value == "*":
            return value
        if not CAPABILITY_NAME_RE.match(value) or len(value) > 128:
            raise ValueError(
                f"capability {value!r} must be a capability name (identifiers joined by '.') or '*'"
            )
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        return None if value is None else _check_specifier(value)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _check_tags(value)

    @model_validator(mode="after")
    def _not_empty(self) -> TargetSelector:
        if self.capability is None and self.version is None and self.tags is None:
            raise ValueError("a target needs capability, version or tags (capability: '*')")
        return self


class AccessRule(Wire):
    """Allow or deny calls from any of ``sources`` to any of ``targets``."""

    name: str
    action: Literal["allow", "deny"]
    sources: tuple[SourceSelector, ...] = Field(min_length=1, max_length=256)
    targets: tuple[TargetSelector, ...] = Field(min_length=1, max_length=256)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value, "rule name")


class AccessPolicySpec(Wire):
    rules: tuple[AccessRule, ...] = Field(min_length=1, max_length=256)

    @field_validator("rules")
    @classmethod
    def _unique(cls, value: tuple[AccessRule, ...]) -> tuple[AccessRule, ...]:
        names = [r.name for r in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"rule names must be unique in a policy; repeated: {repeated}")
        return value


class AccessPolicy(Wire):
    """Who may call what. DENY rules win over ALLOW rules; see docs/policies.md."""

    apiVersion: Literal["agentmesh.dev/v1"]  # the manifest's own spelling, as in Kubernetes
    kind: Literal["AccessPolicy"]
    metadata: PolicyMetadata
    spec: AccessPolicySpec


class RetrySettings(Wire):
    """Overrides of the retry layer (``sidecar/retry.py``); unset fields keep the default."""

    attempts: int | None = Field(default=None, ge=1, le=10)
    backoff: float | None = Field(default=None, ge=0, le=60)
    max_backoff: float | None = Field(default=None, ge=0, le=300)
    per_try_timeout: float | None = Field(
        default=None, gt=0, le=86400, description="Bound on one attempt (Envoy's per_try_timeout)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> RetrySettings:
        if (
            self.backoff is not None
            and self.max_backoff is not None
            and self.max_backoff < self.backoff
        ):
            raise ValueError("max_backoff must be >= backoff")
        return self


class BreakerSettings(Wire):
    """Overrides of the per-endpoint circuit breaker (``sidecar/breaker.py``)."""

    consecutive_failures: int | None = Field(default=None, ge=1, le=1000)
    failure_rate: float | None = Field(default=None, gt=0, le=1)
    min_requests: int | None = Field(default=None, ge=1, le=100000)
    window: float | None = Field(default=None, gt=0, le=3600)
    base_ejection: float | None = Field(default=None, gt=0, le=3600)
    max_ejection: float | None = Field(default=None, gt=0, le=86400)
    half_open_probes: int | None = Field(default=None, ge=1, le=100)
    probe_timeout: float | None = Field(default=None, gt=0, le=3600)

    @model_validator(mode="after")
    def _ordered(self) -> BreakerSettings:
        if (
            self.base_ejection is not None
            and self.max_ejection is not None
            and self.max_ejection < self.base_ejection
        ):
            raise ValueError("max_ejection must be >= base_ejection")
        return self


Balance = Literal["p2c", "round_robin", "random"]


class TrafficSubset(Wire):
    """A version subset of a capability: its share of the calls, and its own overrides."""

    name: str
    version: str = Field(description="PEP 440 specifier selecting the subset, e.g. '>=2,<3'")
    weight: int = Field(ge=0, le=10000, description="Relative share of the calls")
    timeout: float | None = Field(default=None, gt=0, le=86400)
    retry: RetrySettings | None = None
    breaker: BreakerSettings | None = None
    balance: Balance | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value, "subset name")

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return _check_specifier(value)


class TrafficPolicySpec(Wire):
    """How calls to one capability behave: timeouts, retries, breaker, balancing, splits."""

    capability: str
    timeout: float | None = Field(default=None, gt=0, le=86400)
    retry: RetrySettings | None = None
    breaker: BreakerSettings | None = None
    balance: Balance | None = None
    subsets: tuple[TrafficSubset, ...] = Field(default=(), max_length=64)

    @field_validator("capability")
    @classmethod
    def _capability(cls, value: str) -> str:
        if not CAPABILITY_NAME_RE.match(value) or len(value) > 128:
            raise ValueError(f"capability {value!r} must be a capability name (no wildcards)")
        return value

    @field_validator("subsets")
    @classmethod
    def _subsets(cls, value: tuple[TrafficSubset, ...]) -> tuple[TrafficSubset, ...]:
        names = [s.name for s in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"subset names must be unique; repeated: {repeated}")
        if value and not sum(s.weight for s in value):
            raise ValueError("at least one subset needs a weight above 0")
        return value


class TrafficPolicy(Wire):
    """Per-capability call behaviour and weighted version splits; see docs/policies.md."""

    apiVersion: Literal["agentmesh.dev/v1"]  # the manifest's own spelling, as in Kubernetes
    kind: Literal["TrafficPolicy"]
    metadata: PolicyMetadata
    spec: TrafficPolicySpec


#: Either kind, told apart by ``kind``.
Policy = Annotated[AccessPolicy | TrafficPolicy, Field(discriminator="kind")]


class PolicyChange(Wire):
    """What applying or deleting one policy did (``agentmesh apply``, ``delete``)."""

    name: str
    kind: PolicyKind | None = Field(description="null: a stored value that was no policy")
    result: Literal["created", "configured", "unchanged", "deleted"]
    revision: int | None = Field(description="The KV revision written (null on a dry run)")
    dry_run: bool = False


class PolicyRevision(Wire):
    """One entry of a policy's history: a version written, or its deletion."""

    name: str
    revision: int
    operation: Literal["put", "delete"]
    updated: datetime | None = None
    policy: Policy | None = None
    error: str | None = Field(default=None, description="Why a stored value is not a policy")


class PolicySet(Wire):
    """The policies in force: name → SHA-256 (hex) of the bytes stored under that name.

    Signed by the control plane (``SignedState``); a sidecar enforces a stored policy only if
    its bytes have the hash listed here, so an altered, added or deleted key changes nothing.
    """

    policies: dict[str, str] = Field(default_factory=dict)
