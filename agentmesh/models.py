"""Every wire model of the mesh, in one place.

The registry, the control plane, the CLI and the sidecar all speak these shapes, so a change
here is a protocol change. Models are frozen (they are shared between tasks and cached in the
local index) and refuse unknown fields (a typo in a record is an error, not silently lost data).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AGENT_NAME_PATTERN",
    "CAPABILITY_NAME_PATTERN",
    "MAX_RECORD_BYTES",
    "AgentRecord",
    "AgentStatus",
    "Bootstrap",
    "BreakerEvent",
    "CapabilityOffer",
    "CapabilitySpec",
    "EndpointHealth",
    "Problem",
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
    model_config = ConfigDict(frozen=True, extra="forbid")


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
