"""``kind: Agent`` manifests: the capabilities of an app that a standalone sidecar fronts.

An app in another language cannot be introspected the way ``@capability`` reads a Python
signature, so it declares what it offers: each capability's name, version, JSON Schemas and the
app's HTTP path. Everything is checked when the sidecar starts (the schemas against the JSON
Schema meta-schema too), and every mistake is reported with the file, the document, the field and
its line, so a typo never surfaces as a 500 on the first call.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import jsonschema_rs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentmesh.errors import InvalidInput
from agentmesh.models import AGENT_NAME_PATTERN, CAPABILITY_NAME_PATTERN, CapabilitySpec
from agentmesh.policy.manifest import Manifest, describe_errors, load_manifests

__all__ = [
    "AGENT_KIND",
    "AgentCapability",
    "AgentManifest",
    "load_agent_manifest",
    "manifest_from_card",
    "parse_agent_manifest",
]

AGENT_KIND = "Agent"
_PATH_RE = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class AgentMetadata(_Doc):
    name: str = Field(pattern=AGENT_NAME_PATTERN, description="The agent's name (a DNS label)")
    description: str = Field(default="", max_length=1024)


class AgentCapability(_Doc):
    """One capability of the app, and where the app serves it."""

    name: str = Field(pattern=CAPABILITY_NAME_PATTERN, max_length=128)
    version: str = Field(default="0.1.0", max_length=64)
    description: str = Field(default="", max_length=8192)
    tags: tuple[str, ...] = ()
    idempotent: bool = False
    timeout: float | None = Field(default=None, gt=0)
    streaming: bool = False
    input: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    output: dict[str, Any] = Field(default_factory=dict)
    path: str | None = Field(
        default=None,
        description="The app's path for this capability (POST, JSON in; JSON out or SSE). "
        "Default: /<name>",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not _PATH_RE.match(value):
            raise ValueError(f"path {value!r} must start with '/' and be a plain URL path")
        return value

    @field_validator("input", "output")
    @classmethod
    def _schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            jsonschema_rs.meta.validate(value)
        except jsonschema_rs.ValidationError as exc:
            at = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.instance_path)
            raise ValueError(f"not a valid JSON Schema: schema{at}: {exc.message}") from None
        except jsonschema_rs.ReferencingError as exc:
            raise ValueError(f"not a usable JSON Schema: {exc}") from None
        return value

    @property
    def app_path(self) -> str:
        return self.path or f"/{self.name}"

    def spec(self) -> CapabilitySpec:
        """What the registry records for this capability."""
        return CapabilitySpec(
            name=self.name,
            version=self.version,
            description=self.description,
            input_schema=self.input,
            output_schema=self.output,
            tags=self.tags,
            idempotent=self.idempotent,
            streaming=self.streaming,
            timeout=self.timeout,
        )


class AgentSpec(_Doc):
    version: str = Field(default="0.1.0", max_length=64)
    labels: dict[str, str] = Field(default_factory=dict)
    capabilities: tuple[AgentCapability, ...] = Field(min_length=1)

    @field_validator("capabilities")
    @classmethod
    def _unique(cls, value: tuple[AgentCapability, ...]) -> tuple[AgentCapability, ...]:
        seen: set[str] = set()
        for cap in value:
            if cap.name in seen:
                raise ValueError(f"two capabilities named {cap.name!r}")
            seen.add(cap.name)
        return value


class AgentManifest(_Doc):
    """``apiVersion: agentmesh.dev/v1``, ``kind: Agent``: an app's capabilities."""

    api_version: Literal["agentmesh.dev/v1"] = Field(alias="apiVersion")
    kind: Literal["Agent"]
    metadata: AgentMetadata
    spec: AgentSpec


def parse_agent_manifest(data: Any) -> AgentManifest:
    """One decoded document → an AgentManifest, or InvalidInput naming every bad field.

    The capability specs are built too, so that what the registry would refuse (a version
    that is not PEP 440, a bad tag) is refused here, with its field.
    """
    if not isinstance(data, dict):
        raise InvalidInput(
            "an Agent manifest must be a mapping with apiVersion, kind, metadata and spec",
            errors=[{"loc": "(document)", "path": [], "msg": f"got {type(data).__name__}"}],
        )
    try:
        manifest = AgentManifest.model_validate(data)
        for i, cap in enumerate(manifest.spec.capabilities):
            _spec_of(cap, i)
    except ValidationError as exc:
        errors = describe_errors(exc)
        meta = data.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        what = f"Agent {name!r}" if isinstance(name, str) else "Agent"
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidInput(f"{what}: {first['loc']}: {first['msg']}{more}", errors=errors) from exc
    return manifest


def _spec_of(cap: AgentCapability, index: int) -> CapabilitySpec:
    try:
        return cap.spec()
    except ValidationError as exc:
        # Re-anchor the spec's errors at the capability's place in the document.
        raise ValidationError.from_exception_data(
            "AgentManifest",
            [
                {
                    "type": "value_error",
                    "loc": ("spec", "capabilities", index, *_manifest_field(e["loc"])),
                    "input": e.get("input"),
                    "ctx": {"error": ValueError(e["msg"].removeprefix("Value error, "))},
                }
                for e in exc.errors()
            ],
        ) from exc


def _manifest_field(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    renamed = {"input_schema": "input", "output_schema": "output"}
    return tuple(renamed.get(p, p) if isinstance(p, str) else p for p in loc)


def load_agent_manifest(path: str) -> AgentManifest:
    """The one ``kind: Agent`` document of a file; errors name the file, document and line."""
    documents: list[Manifest] = load_manifests([path])
    agents = [d for d in documents if isinstance(d.data, dict) and d.data.get("kind") == AGENT_KIND]
    if len(agents) != 1:
        kinds = ", ".join(
            str(d.data.get("kind")) if isinstance(d.data, dict) else type(d.data).__name__
            for d in documents
        )
        raise InvalidInput(
            f"{path}: expected exactly one document of kind Agent, found {len(agents)}"
            + (f" (kinds: {kinds})" if documents else "")
        )
    document = agents[0]
    try:
        return parse_agent_manifest(document.data)
    except InvalidInput as exc:
        raise document.problem(exc) from exc


def manifest_from_card(card: Any, source: str) -> AgentManifest:
    """The manifest an A2A agent card implies, for an app that serves the agents' wire shape.

    Each skill becomes a capability served at ``POST /v1/invoke/<skill id>`` (the path an
    agentmesh agent, whose own card lists its capabilities as skills, serves them at); it streams
    when its output modes include ``text/event-stream``. A card carries no JSON Schemas, so any
    JSON object is accepted as input and the app checks the rest. The agent's name is the card's
    name as a DNS label. Errors name ``source`` and the card's field.
    """
    if not isinstance(card, dict) or not isinstance(card.get("skills"), list):
        raise InvalidInput(f"{source}: not an A2A agent card (an object with a skills list)")
    name = re.sub(r"[^a-z0-9]+", "-", str(card.get("name", "")).lower()).strip("-")[:63]
    streams = "text/event-stream"
    capabilities = []
    for i, skill in enumerate(card["skills"]):
        if not isinstance(skill, dict):
            raise InvalidInput(f"{source}: skills[{i}] is not an object")
        capabilities.append(
            {
                "name": skill.get("id"),
                "description": skill.get("description") or "",
                "tags": skill.get("tags") or [],
                "version": str(card.get("version") or "0.1.0"),
                "streaming": streams in (skill.get("outputModes") or []),
                "path": f"/v1/invoke/{skill.get('id')}",
            }
        )
    document = {
        "apiVersion": "agentmesh.dev/v1",
        "kind": AGENT_KIND,
        "metadata": {"name": name, "description": str(card.get("description") or "")[:1024]},
        "spec": {"version": str(card.get("version") or "0.1.0"), "capabilities": capabilities},
    }
    try:
        return parse_agent_manifest(document)
    except InvalidInput as exc:
        where = exc.errors[0]["loc"] if exc.errors else ""
        field = _card_field(str(where))
        raise InvalidInput(
            f"{source}: card field {field}: {exc.errors[0]['msg'] if exc.errors else exc}",
            errors=exc.errors,
        ) from exc


def _card_field(loc: str) -> str:
    """A manifest location (``spec.capabilities[2].name``) as the card field it came from."""
    loc = re.sub(r"^spec\.capabilities\[(\d+)\]\.version$", "version", loc)
    loc = re.sub(r"^spec\.capabilities\[(\d+)\]\.name$", r"skills[\1].id", loc)
    loc = re.sub(r"^spec\.capabilities\[(\d+)\]", r"skills[\1]", loc)
    return {"metadata.name": "name", "spec.version": "version"}.get(loc, loc)
