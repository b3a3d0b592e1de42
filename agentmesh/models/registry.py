"""The registry's shapes: an agent's record and capabilities, what ``find`` returns, what a
joining process is told (``Bootstrap``), and the proof a record carries.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from agentmesh.models._base import AGENT_NAME_RE, CAPABILITY_NAME_PATTERN, Wire

__all__ = [
    "MAX_RECORD_BYTES",
    "AgentRecord",
    "AgentStatus",
    "Bootstrap",
    "CapabilityOffer",
    "CapabilitySpec",
    "RecordProof",
]


#: A record larger than this is refused: it would slow every watcher in the mesh.
MAX_RECORD_BYTES = 256 * 1024
_INSTANCE_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,94}[a-z0-9])?$")

#: ``serving`` takes new calls; ``unready`` (its readiness check fails) and ``draining``
#: (stopping) finish the calls they have but get no new ones.
AgentStatus = Literal["serving", "unready", "draining"]


class CapabilitySpec(Wire):
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


class AgentRecord(Wire):
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
        if not AGENT_NAME_RE.match(value):
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


class CapabilityOffer(Wire):
    """One capability as offered by one live agent instance: a row of ``find``."""

    capability: CapabilitySpec
    agent: str
    instance_id: str
    endpoint: str
    agent_version: str
    labels: dict[str, str] = Field(default_factory=dict)
    status: AgentStatus = "serving"


class Bootstrap(Wire):
    """What the control plane tells a joining agent or CLI, so that one URL is enough."""

    nats_url: str
    registry_bucket: str
    control_url: str
    version: str
    heartbeat_interval: float
    lease_ttl: int


class RecordProof(Wire):
    """The registering workload's signature over its registry record, and its certificate.

    Stored after the record's JSON, on a line of its own, under the record's key.
    """

    certificate: list[str] = Field(min_length=1, description="PEM: the leaf, then intermediates")
    signature: str = Field(description="Base64 signature by the leaf's key over the record bytes")


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
