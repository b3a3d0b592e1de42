"""``/v1/policies``: create, read, update, delete and the history of access and traffic policies.

Policies live in the policy bucket (``policy/store.py``); the control plane validates and
writes them, then lists them in the signed policy set (``control/policyset.py``), and every
sidecar picks changes up from its watch (enforcing only what the signed set lists). Writes
are compare-and-set, so concurrent ``apply`` runs never lose an update; applying what is
already stored writes nothing (``unchanged``), so ``apply`` is idempotent. Bodies are one
manifest, as JSON or YAML.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Query, Request
from pydantic import ValidationError

from agentmesh.control.policyset import PolicySigner
from agentmesh.errors import InvalidInput, RouteNotFound
from agentmesh.models import (
    AGENT_NAME_PATTERN,
    AccessPolicy,
    PolicyChange,
    PolicyKind,
    PolicyRevision,
    Problem,
    TrafficPolicy,
)
from agentmesh.policy.manifest import error_listing, parse_policy, validate_manifest
from agentmesh.policy.store import PolicyConflict, PolicyEntry, PolicyStore
from agentmesh.sidecar.sidecar import Sidecar

__all__ = ["apply_policy", "policy_router"]

_PROBLEM = {"model": Problem, "content": {"application/problem+json": {}}}
_YAML = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
#: Compare-and-set attempts before a write gives up (each re-reads the current state).
_CAS_ATTEMPTS = 5

_NAME = re.compile(AGENT_NAME_PATTERN)

AnyPolicy = AccessPolicy | TrafficPolicy


def _stored(policy: AnyPolicy) -> bytes:
    """The bytes stored for ``policy``: read-only metadata stripped, keys in a stable order."""
    meta = policy.metadata.model_copy(update={"revision": None, "updated": None})
    clean = policy.model_copy(update={"metadata": meta})
    return clean.model_dump_json(exclude_none=True).encode()


def _decode(entry: PolicyEntry) -> AnyPolicy:
    """A stored value as a policy with its revision and time filled in; ValueError if invalid."""
    policy = parse_policy(json.loads(entry.value))
    meta = policy.metadata.model_copy(update={"revision": entry.revision, "updated": entry.updated})
    return policy.model_copy(update={"metadata": meta})


def _revision(entry: PolicyEntry) -> PolicyRevision:
    if entry.operation == "delete":
        return PolicyRevision(
            name=entry.name, revision=entry.revision, operation="delete", updated=entry.updated
        )
    try:
        policy: AnyPolicy | None = _decode(entry)
        error = None
    except ValidationError as exc:
        policy, error = None, error_listing(exc)
    except ValueError as exc:
        policy, error = None, f"not JSON: {exc}"
    return PolicyRevision(
        name=entry.name,
        revision=entry.revision,
        operation="put",
        updated=entry.updated,
        policy=policy,
        error=error,
    )


async def apply_policy(signer: PolicySigner, data: Any, *, dry_run: bool = False) -> PolicyChange:
    """Create or update one policy (compare-and-set), then sign it into the policy set; nothing
    is written if it is unchanged (but an unchanged policy the set lacks is signed into it)."""
    store = signer.store
    policy = validate_manifest(data)
    name = policy.metadata.name
    value = _stored(policy)
    for _ in range(_CAS_ATTEMPTS):
        latest = await store.latest(name)
        last = latest.revision if latest is not None else 0
        result = "created"
        if latest is not None and latest.operation == "put":
            result = "configured"
            if latest.value == value:
                if not dry_run:
                    await signer.sign(name, latest.revision, value)
                return PolicyChange(
                    name=name,
                    kind=policy.kind,
                    result="unchanged",
                    revision=latest.revision,
                    dry_run=dry_run,
                )
            _check_same_kind(latest, policy)
        if isinstance(policy, TrafficPolicy):
            await _check_one_per_capability(store, policy)
        if dry_run:
            return PolicyChange(
                name=name, kind=policy.kind, result=result, revision=None, dry_run=True
            )
        try:
            revision = await store.put(name, value, last=last)
        except PolicyConflict:
            continue
        await signer.sign(name, revision, value)
        return PolicyChange(name=name, kind=policy.kind, result=result, revision=revision)
    raise InvalidInput(f"policy {name!r} kept changing while it was applied; try again")


def _check_same_kind(latest: PolicyEntry, policy: AnyPolicy) -> None:
    try:
        kind = json.loads(latest.value).get("kind")
    except (ValueError, AttributeError):
        return  # an invalid stored value: replacing it is the fix
    if isinstance(kind, str) and kind != policy.kind:
        raise InvalidInput(
            f"policy {policy.metadata.name!r} exists as a {kind}; names are unique across kinds "
            f"(delete it first to reuse the name for a {policy.kind})",
            errors=[{"loc": "kind", "msg": f"the stored policy is a {kind}"}],
        )


async def _check_one_per_capability(store: PolicyStore, policy: TrafficPolicy) -> None:
    capability = policy.spec.capability
    for entry in await store.all():
        if entry.name == policy.metadata.name:
            continue
        try:
            data = json.loads(entry.value)
        except ValueError:
            continue
        if (
            isinstance(data, dict)
            and data.get("kind") == "TrafficPolicy"
            and isinstance(data.get("spec"), dict)
            and data["spec"].get("capability") == capability
        ):
            raise InvalidInput(
                f"TrafficPolicy {policy.metadata.name!r}: TrafficPolicy {entry.name!r} already "
                f"applies to capability {capability!r}; one per capability (put subsets in it)",
                errors=[{"loc": "spec.capability", "msg": f"taken by {entry.name}"}],
            )


async def _body(request: Request) -> Any:
    raw = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type in _YAML:
            return yaml.safe_load(raw)
        return json.loads(raw)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "YAML" if content_type in _YAML else "JSON"
        raise InvalidInput(f"the request body is not {kind}: {exc}") from exc


def policy_router(sidecar: Sidecar, signer: PolicySigner) -> APIRouter:
    store = sidecar.policies.store
    router = APIRouter(prefix="/v1/policies", tags=["policies"])
    body_doc: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/yaml": {"schema": {"type": "string"}},
            },
            "description": "One AccessPolicy or TrafficPolicy manifest (see docs/policies.md).",
        }
    }

    @router.get("")
    async def list_policies(
        kind: Annotated[PolicyKind | None, Query(description="Only policies of this kind")] = None,
    ) -> list[PolicyRevision]:
        """The current revision of every policy (invalid stored values say why)."""
        rows = [_revision(e) for e in await store.all()]
        return [r for r in rows if kind is None or r.policy is None or r.policy.kind == kind]

    @router.post("", responses={422: _PROBLEM}, openapi_extra=body_doc)
    async def apply(
        request: Request,
        dry_run: Annotated[bool, Query(description="Validate and report; write nothing")] = False,
    ) -> PolicyChange:
        """Create or update the policy named in the manifest (``agentmesh apply``)."""
        return await apply_policy(signer, await _body(request), dry_run=dry_run)

    @router.get("/{name}", responses={404: _PROBLEM})
    async def get_policy(name: str) -> AccessPolicy | TrafficPolicy:
        """One policy, with its revision and time in ``metadata``."""
        entry = await store.latest(name) if _key_ok(name) else None
        if entry is None or entry.operation == "delete":
            raise RouteNotFound(f"no policy named {name!r}")
        revision = _revision(entry)
        if revision.policy is None:
            raise InvalidInput(
                f"policy {name!r} as stored is invalid and fails closed ({revision.error}); "
                "apply a fixed version or delete it"
            )
        return revision.policy

    @router.put("/{name}", responses={404: _PROBLEM, 422: _PROBLEM}, openapi_extra=body_doc)
    async def put_policy(
        name: str,
        request: Request,
        dry_run: Annotated[bool, Query(description="Validate and report; write nothing")] = False,
    ) -> PolicyChange:
        """Create or update policy ``name``; the manifest must carry the same name."""
        data = await _body(request)
        meta = data.get("metadata") if isinstance(data, dict) else None
        if isinstance(meta, dict) and meta.get("name") != name:
            raise InvalidInput(
                f"the manifest is named {meta.get('name')!r}, not {name!r}",
                errors=[{"loc": "metadata.name", "msg": f"must be {name!r}"}],
            )
        return await apply_policy(signer, data, dry_run=dry_run)

    @router.delete("/{name}", responses={404: _PROBLEM})
    async def delete_policy(
        name: str,
        dry_run: Annotated[bool, Query(description="Report; delete nothing")] = False,
    ) -> PolicyChange:
        """Delete policy ``name`` (a new revision: its history stays)."""
        for _ in range(_CAS_ATTEMPTS):
            entry = await store.latest(name) if _key_ok(name) else None
            if entry is None or entry.operation == "delete":
                raise RouteNotFound(f"no policy named {name!r}")
            try:
                kind = json.loads(entry.value).get("kind")
            except (ValueError, AttributeError):
                kind = None
            kind = kind if kind in ("AccessPolicy", "TrafficPolicy") else None
            if dry_run:
                return PolicyChange(
                    name=name, kind=kind, result="deleted", revision=None, dry_run=True
                )
            # Out of the signed set first: sidecars stop enforcing it before the key goes.
            await signer.sign(name, entry.revision, None)
            try:
                revision = await store.delete(name, last=entry.revision)
            except PolicyConflict:
                continue
            return PolicyChange(name=name, kind=kind, result="deleted", revision=revision)
        raise InvalidInput(f"policy {name!r} kept changing while it was deleted; try again")

    @router.get("/{name}/history", responses={404: _PROBLEM})
    async def policy_history(name: str) -> list[PolicyRevision]:
        """Every kept revision of policy ``name``, oldest first, deletions included."""
        entries = await store.history(name) if _key_ok(name) else []
        if not entries:
            raise RouteNotFound(f"no policy named {name!r} (nor any history of one)")
        return [_revision(e) for e in entries]

    return router


def _key_ok(name: str) -> bool:
    """Only names a policy can have reach NATS (a subject with '*' or '>' would be a wildcard)."""
    return _NAME.match(name) is not None
