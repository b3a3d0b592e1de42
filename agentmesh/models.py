"""Every wire model of the mesh, in one place.

The registry, the control plane, the CLI and the sidecar all speak these shapes, so a change
here is a protocol change. Models are frozen (they are shared between tasks and cached in the
local index) and refuse unknown fields (a typo in a record is an error, not silently lost data).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AGENT_NAME_PATTERN",
    "CAPABILITY_NAME_PATTERN",
    "MAX_RECORD_BYTES",
    "POLICY_API_VERSION",
    "AccessPolicy",
    "AccessPolicySpec",
    "AccessRule",
    "AgentRecord",
    "AgentStatus",
    "Bootstrap",
    "BreakerEvent",
    "BreakerSettings",
    "BundleSignature",
    "CapabilityOffer",
    "CapabilitySpec",
    "CertificateRequest",
    "EndpointHealth",
    "IdentityBlock",
    "IdentityRecord",
    "IssuedCertificate",
    "JetStreamMeta",
    "JoinToken",
    "JoinTokenRequest",
    "MetaPeer",
    "Policy",
    "PolicyChange",
    "PolicyKind",
    "PolicyMetadata",
    "PolicyRevision",
    "PolicySet",
    "Problem",
    "RecordProof",
    "RenewalProof",
    "RetrySettings",
    "Revocation",
    "RevocationList",
    "RevocationRequest",
    "RevocationResult",
    "SignedState",
    "SourceSelector",
    "StatGroup",
    "StatRow",
    "StatsEntry",
    "StatsReport",
    "StoredToken",
    "TapAck",
    "TapEvent",
    "TapRequest",
    "TargetSelector",
    "TrafficPolicy",
    "TrafficPolicySpec",
    "TrafficSubset",
    "TrustBundle",
]

#: Agent names become SPIFFE path segments and KV keys: a DNS label keeps them portable.
AGENT_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
#: Capability names are Python identifiers, optionally dotted (``nlp.summarize``).
CAPABILITY_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$"
#: A record larger than this is refused: it would slow every watcher in the mesh.
MAX_RECORD_BYTES = 256 * 1024

_AGENT_NAME_RE = re.compile(AGENT_NAME_PATTERN)
_INSTANCE_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,94}[a-z0-9])?$")

#: ``serving`` takes new calls; ``unready`` (its readiness check fails) and ``draining``
#: (stopping) finish the calls they have but get no new ones.
AgentStatus = Literal["serving", "unready", "draining"]


class _Wire(BaseModel):
    # defer_build: a model's validator and serializer are built when it is first used, not at
    # import. Every process imports all of these shapes and uses a few (an agent: its record
    # and a bootstrap), and building them all was ~20 ms of an agent's start-up.
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class _RequestBody(_Wire):
    """A request body of the control plane's API, built at import (no defer_build).

    FastAPI wraps a body parameter's model in ``Annotated[Model, Field(alias=...)]``; for a model
    whose schema is deferred, pydantic then builds it with the alias where it means nothing and
    warns (``UnsupportedFieldAttributeWarning``) at every control plane start.
    """

    model_config = ConfigDict(defer_build=False)


class CapabilitySpec(_Wire):
    """What one capability offers: enough for a caller in any language to use it."""

    name: str = Field(pattern=CAPABILITY_NAME_PATTERN, max_length=128)
    version: str = Field(default="0.1.0", max_length=64)
    description: str = Field(default="", max_length=8192)
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    tags: tuple[str, ...] = ()
    idempotent: bool = False
    streaming: bool = False
    timeout: float | None = Field(default=None, gt=0)

    @field_validator("version")
    @classmethod
    def _pep440(cls, value: str) -> str:
        from packaging.version import InvalidVersion, Version

        try:
            Version(value)
        except InvalidVersion as exc:
            raise ValueError(f"version {value!r} is not a PEP 440 version (e.g. 1.2.0)") from exc
        return value

    @field_validator("input_schema", "output_schema")
    @classmethod
    def _json_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_json_schema(value)
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for tag in value:
            if not tag or len(tag) > 64 or not tag.isprintable() or " " in tag:
                raise ValueError(f"tag {tag!r} must be 1-64 printable characters without spaces")
        return value


class AgentRecord(_Wire):
    """One running agent instance, as stored under its key in the registry."""

    instance_id: str
    name: str
    version: str = "0.1.0"
    endpoint: str
    capabilities: tuple[CapabilitySpec, ...]
    labels: dict[str, str] = Field(default_factory=dict)
    identity: str | None = None
    mtls: Literal["strict", "permissive", "off"] = "off"
    """How the agent's inbound side treats callers without a mesh certificate."""
    status: AgentStatus = "serving"
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _AGENT_NAME_RE.match(value):
            raise ValueError(
                f"agent name {value!r} must be lowercase letters, digits and '-', "
                "1-63 characters, starting and ending with a letter or digit"
            )
        return value

    @field_validator("instance_id")
    @classmethod
    def _instance_id(cls, value: str) -> str:
        if not _INSTANCE_ID_RE.match(value):
            raise ValueError(f"instance id {value!r} must be lowercase letters, digits and '-'")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not re.match(r"^(https?|nats)://[^\s/]+", value):
            raise ValueError(f"endpoint {value!r} must be an http://, https:// or nats:// URL")
        return value.rstrip("/")

    @field_validator("capabilities")
    @classmethod
    def _unique_capabilities(cls, value: tuple[CapabilitySpec, ...]) -> tuple[CapabilitySpec, ...]:
        names = [spec.name for spec in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"capability names must be unique; repeated: {', '.join(duplicates)}")
        return value


class CapabilityOffer(_Wire):
    """One capability as offered by one live agent instance: a row of ``find``."""

    capability: CapabilitySpec
    agent: str
    instance_id: str
    endpoint: str
    agent_version: str
    labels: dict[str, str] = Field(default_factory=dict)
    status: AgentStatus = "serving"


class Bootstrap(_Wire):
    """What the control plane tells a joining agent or CLI, so that one URL is enough."""

    nats_url: str
    registry_bucket: str
    control_url: str
    version: str
    heartbeat_interval: float
    lease_ttl: int


class MetaPeer(_Wire):
    """A JetStream server of the meta group, as another server sees it."""

    name: str
    current: bool = False
    offline: bool = False


class JetStreamMeta(_Wire):
    """The NATS cluster's JetStream meta group (``GET /v1/nats/meta``): the leader that places
    streams (no leader, no new bucket or consumer), as ``server`` reports it with its peers."""

    cluster: str
    leader: str
    server: str
    peers: list[MetaPeer] = Field(default_factory=list)


class BreakerEvent(_Wire):
    """A sidecar's circuit breaker for one endpoint changed state (published on NATS)."""

    observer: str
    instance_id: str
    state: Literal["closed", "open", "half_open"]
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class EndpointHealth(_Wire):
    """What the sidecars report about one instance: who currently ejects it."""

    instance_id: str
    ejected_by: list[str] = Field(default_factory=list)
    probing_by: list[str] = Field(default_factory=list)


class StatsEntry(_Wire):
    """One key of a sidecar's interval: how many calls, their total time and latency histogram.

    ``buckets`` is sparse: ``[index, count]`` pairs over the fixed log-spaced bounds named by
    the report's ``scheme`` (see ``agentmesh.telemetry.stats``).
    """

    direction: Literal["outbound", "inbound"]
    agent: str = Field(max_length=128, description="outbound: the caller; inbound: the server")
    capability: str = Field(max_length=256)
    peer: str = Field(
        default="-", max_length=128, description="outbound: the callee agent ('-': none reached)"
    )
    status: str = Field(max_length=64, description="outbound: ok or error; inbound: HTTP status")
    count: int = Field(ge=0)
    total: float = Field(ge=0, description="Sum of the calls' durations, in seconds")
    buckets: list[tuple[int, int]] = Field(default_factory=list)


class StatsReport(_Wire):
    """What one sidecar saw during one interval, published on ``agentmesh.stats.<bucket>``."""

    reporter: str = Field(max_length=128, description="The sidecar (an agent's instance id)")
    scheme: str
    start: datetime
    end: datetime
    entries: list[StatsEntry]


#: How ``/v1/stats`` groups calls: per serving agent, per capability, per caller→callee edge.
StatGroup = Literal["agents", "capabilities", "edges"]


class StatRow(_Wire):
    """Golden metrics of one agent, capability or edge over a window (``GET /v1/stats``)."""

    group: StatGroup
    name: str
    caller: str | None = None
    callee: str | None = None
    window: float = Field(description="Seconds of data the numbers cover")
    requests: int
    failures: int
    rps: float
    success_rate: float | None = Field(description="0..1; null without requests")
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


class TapRequest(_Wire):
    """``agentmesh tap`` asks the sidecars serving ``capability`` to publish its calls.

    Re-sent every second; a sidecar stops publishing ``ttl`` seconds after the last one.
    """

    capability: str = Field(max_length=256)
    payloads: bool = False
    ttl: float = Field(default=3.0, gt=0, le=60)
    tapper: str = Field(default="-", max_length=128)


class TapAck(_Wire):
    """A sidecar's answer to a :class:`TapRequest`: it publishes, with or without payloads."""

    instance_id: str
    agent: str
    payloads: bool


class TapEvent(_Wire):
    """One call, as the serving sidecar saw it, on ``agentmesh.tap.<bucket>.<capability>``."""

    at: datetime
    capability: str
    agent: str
    instance_id: str
    caller: str
    status: int
    duration_ms: float
    trace_id: str | None = None
    request: str | None = None
    response: str | None = None


# ---- policies (docs/policies.md) ------------------------------------------------------------
#
# Manifests in the Kubernetes shape (apiVersion, kind, metadata, spec), stored one per key in a
# JetStream KV bucket and watched by every sidecar. Every pattern is matched exactly as written:
# nothing is lower-cased, trimmed or resolved, and a pattern that could be read two ways is
# refused here, at validation, rather than guessed at when a call is decided.

#: The only manifest version so far.
POLICY_API_VERSION = "agentmesh.dev/v1"
PolicyKind = Literal["AccessPolicy", "TrafficPolicy"]

_POLICY_NAME_RE = _AGENT_NAME_RE
_CAPABILITY_NAME_RE = re.compile(CAPABILITY_NAME_PATTERN)
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


class PolicyMetadata(_Wire):
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


class SourceSelector(_Wire):
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


class TargetSelector(_Wire):
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
        if not _CAPABILITY_NAME_RE.match(value) or len(value) > 128:
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


class AccessRule(_Wire):
    """Allow or deny calls from any of ``sources`` to any of ``targets``."""

    name: str
    action: Literal["allow", "deny"]
    sources: tuple[SourceSelector, ...] = Field(min_length=1, max_length=256)
    targets: tuple[TargetSelector, ...] = Field(min_length=1, max_length=256)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value, "rule name")


class AccessPolicySpec(_Wire):
    rules: tuple[AccessRule, ...] = Field(min_length=1, max_length=256)

    @field_validator("rules")
    @classmethod
    def _unique(cls, value: tuple[AccessRule, ...]) -> tuple[AccessRule, ...]:
        names = [r.name for r in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"rule names must be unique in a policy; repeated: {repeated}")
        return value


class AccessPolicy(_Wire):
    """Who may call what. DENY rules win over ALLOW rules; see docs/policies.md."""

    apiVersion: Literal["agentmesh.dev/v1"]  # the manifest's own spelling, as in Kubernetes
    kind: Literal["AccessPolicy"]
    metadata: PolicyMetadata
    spec: AccessPolicySpec


class RetrySettings(_Wire):
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


class BreakerSettings(_Wire):
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


class TrafficSubset(_Wire):
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


class TrafficPolicySpec(_Wire):
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
        if not _CAPABILITY_NAME_RE.match(value) or len(value) > 128:
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


class TrafficPolicy(_Wire):
    """Per-capability call behaviour and weighted version splits; see docs/policies.md."""

    apiVersion: Literal["agentmesh.dev/v1"]  # the manifest's own spelling, as in Kubernetes
    kind: Literal["TrafficPolicy"]
    metadata: PolicyMetadata
    spec: TrafficPolicySpec


#: Either kind, told apart by ``kind``.
Policy = Annotated[AccessPolicy | TrafficPolicy, Field(discriminator="kind")]


class PolicyChange(_Wire):
    """What applying or deleting one policy did (``agentmesh apply``, ``delete``)."""

    name: str
    kind: PolicyKind | None = Field(description="null: a stored value that was no policy")
    result: Literal["created", "configured", "unchanged", "deleted"]
    revision: int | None = Field(description="The KV revision written (null on a dry run)")
    dry_run: bool = False


class PolicyRevision(_Wire):
    """One entry of a policy's history: a version written, or its deletion."""

    name: str
    revision: int
    operation: Literal["put", "delete"]
    updated: datetime | None = None
    policy: Policy | None = None
    error: str | None = Field(default=None, description="Why a stored value is not a policy")


class BundleSignature(_Wire):
    """One signature over a :class:`TrustBundle`, by a root or a CA chaining to one."""

    signer: str = Field(description="PEM certificate whose key made the signature")
    chain: list[str] = Field(
        default_factory=list, description="PEM certificates from the signer up to a root"
    )
    signature: str = Field(description="Base64 signature (ECDSA or RSA, SHA-256)")


class TrustBundle(_Wire):
    """The CA roots every sidecar trusts, versioned and signed.

    Published at ``GET /v1/trust-bundle`` and in the security KV bucket; a sidecar takes a newer
    version only if a root it already trusts signed it, so root rotation reaches everyone while a
    writer of the bucket cannot add a root of its own.
    """

    trust_domain: str
    version: int = Field(ge=1)
    roots: list[str] = Field(min_length=1, description="PEM root certificates")
    issued_at: datetime
    signatures: list[BundleSignature] = Field(default_factory=list)


class RenewalProof(_Wire):
    """Renewal is authenticated by the current certificate and its key, not the join token."""

    certificate: str = Field(description="PEM: the current leaf, then its intermediates")
    timestamp: datetime
    signature: str = Field(
        description="Base64 signature by the current key over the new CSR and the timestamp"
    )


class CertificateRequest(_RequestBody):
    """``POST /v1/certificates``: a CSR plus either a join token or a renewal proof."""

    csr: str = Field(max_length=16384, description="PEM CSR with one URI SAN: the SPIFFE ID")
    token: str | None = Field(default=None, max_length=512)
    renewal: RenewalProof | None = None
    nats_key: str | None = Field(
        default=None,
        pattern=r"^U[A-Z2-7]{55}$",
        description="Public user NKEY of the requester: the answer then carries a NATS user JWT "
        "bound to it, with this identity's NATS permissions",
    )


class IssuedCertificate(_Wire):
    """What the CA answers: the certificate, its chain, and the trust bundle."""

    spiffe_id: str
    serial: str = Field(description="Hexadecimal serial number")
    certificate: str = Field(description="PEM leaf certificate")
    chain: list[str] = Field(default_factory=list, description="PEM intermediates, if any")
    not_after: datetime
    trust_bundle: TrustBundle
    nats_jwt: str | None = Field(
        default=None, description="NATS user JWT for the request's nats_key (same expiry)"
    )


class JoinTokenRequest(_RequestBody):
    """``POST /v1/tokens``: a token that lets one agent (or client) name enrol."""

    agent: str | None = Field(default=None, pattern=AGENT_NAME_PATTERN)
    client: str | None = Field(default=None, max_length=64)
    ttl: float = Field(default=3600.0, gt=0, le=30 * 86400, description="Seconds it stays valid")
    uses: int | None = Field(
        default=1, ge=1, description="Enrolments it allows (null: any number within its TTL)"
    )

    @model_validator(mode="after")
    def _one_subject(self) -> JoinTokenRequest:
        if (self.agent is None) == (self.client is None):
            raise ValueError("give exactly one of agent or client")
        return self


class JoinToken(_Wire):
    """A join token as created; the secret is shown once and stored only as a hash."""

    token: str
    identity: str = Field(description="The SPIFFE ID it enrols, or a pattern ending in '*'")
    expires_at: datetime | None = None
    uses: int | None = None


class StoredToken(_Wire):
    """A join token as the control plane keeps it in KV, under the hash of its secret."""

    digest: str = Field(description="SHA-256 of the secret: the key it is stored under")
    identity: str
    created_at: datetime
    expires_at: datetime | None = None
    uses: int | None = None


class IdentityRecord(_Wire):
    """One certificate the CA issued (``agentmesh identity list``)."""

    spiffe_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    via: Literal["token", "renewal", "local"]
    revoked: bool = False
    nats_key: str | None = Field(
        default=None, description="The public NKEY its NATS user JWT was issued for, if any"
    )


class Revocation(_Wire):
    """A revoked certificate: every sidecar refuses it within about a second."""

    serial: str
    spiffe_id: str | None = Field(
        default=None, description="Whose it was; None when revoked by serial with no record of it"
    )
    not_after: datetime = Field(description="Kept in the list until then (plus clock slack)")
    revoked_at: datetime
    reason: str = ""
    nats_key: str | None = Field(
        default=None, description="The NATS user key of its JWT: NATS refuses it too"
    )


class IdentityBlock(_Wire):
    """After ``identity revoke NAME``: only tokens created after ``at`` may enrol it again."""

    spiffe_id: str
    at: datetime


class RevocationRequest(_RequestBody):
    """``POST /v1/revocations``: a certificate serial (hex), an agent name, or a SPIFFE ID.

    ``kind`` says which ``target`` is; ``auto`` reads it from its syntax (``spiffe://…`` is a
    SPIFFE ID, ``0x…`` a serial, a name with a letter beyond ``f`` or a ``-`` a name) and refuses
    what could be either (``cafe``), so a serial is never taken for a name or the reverse.
    """

    target: str = Field(min_length=1, max_length=256)
    kind: Literal["auto", "serial", "name", "spiffe-id"] = "auto"
    reason: str = Field(default="", max_length=256)


class RevocationList(_Wire):
    """Every revocation in force, as one document the control plane signs (``SignedState``).

    One document rather than a key per serial: deleting it, or an entry of it, from NATS changes
    nothing a sidecar enforces (it keeps the last list it verified).
    """

    revoked: list[Revocation] = Field(default_factory=list)
    blocked: list[IdentityBlock] = Field(default_factory=list)


class PolicySet(_Wire):
    """The policies in force: name → SHA-256 (hex) of the bytes stored under that name.

    Signed by the control plane (``SignedState``); a sidecar enforces a stored policy only if
    its bytes have the hash listed here, so an altered, added or deleted key changes nothing.
    """

    policies: dict[str, str] = Field(default_factory=dict)


class SignedState(_Wire):
    """Mesh state the control plane vouches for: a document, its version, a CA's signature.

    The signature covers ``kind``, ``version`` and the exact ``payload`` bytes (JSON text), so
    a document of one kind can never pass for another. ``version`` only grows: a reader refuses
    one lower than the last it took (a replayed old document).
    """

    kind: Literal["revocations", "policies", "token"]
    version: int = Field(ge=1)
    payload: str = Field(description="The document (RevocationList, PolicySet, StoredToken), JSON")
    signer: str = Field(description="PEM certificate of the signing CA")
    chain: list[str] = Field(default_factory=list, description="PEM certificates up to a root")
    signature: str = Field(description="Base64 signature (ECDSA or RSA, SHA-256)")


class RecordProof(_Wire):
    """The registering workload's signature over its registry record, and its certificate.

    Stored after the record's JSON, on a line of its own, under the record's key.
    """

    certificate: list[str] = Field(min_length=1, description="PEM: the leaf, then intermediates")
    signature: str = Field(description="Base64 signature by the leaf's key over the record bytes")


class RevocationResult(_Wire):
    revoked: list[Revocation]


class Problem(_Wire):
    """An RFC 9457 problem document; ``code`` is the stable field callers act on."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    code: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None
    retry_after: float | None = None
    trace_id: str | None = None


_JSON_SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _check_json_schema(schema: Any, path: str = "$") -> None:
    """Shallow structural check: a schema is an object whose ``type`` names JSON types.

    A full meta-schema validation would need another dependency; this catches what a hand-written
    or foreign registration gets wrong in practice (a list, a string, a made-up type).
    """
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a JSON Schema must be an object, got {type(schema).__name__}")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in _JSON_SCHEMA_TYPES:
            raise ValueError(f"{path}.type: {k!r} is not a JSON Schema type")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise ValueError(f"{path}.properties must be an object")
        for key, sub in props.items():
            _check_json_schema(sub, f"{path}.properties.{key}")
    for key in ("items", "additionalProperties"):
        if key in schema:
            _check_json_schema(schema[key], f"{path}.{key}")
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            if not isinstance(schema[key], list):
                raise ValueError(f"{path}.{key} must be an array")
            for i, sub in enumerate(schema[key]):
                _check_json_schema(sub, f"{path}.{key}[{i}]")
