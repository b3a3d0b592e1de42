"""Fixtures of the policy tests: callers with names, policy writes, a control plane process.

Caller identity lives in one place, ``mesh_as``: a client named with ``AGENTMESH_CLIENT_NAME``,
whose sidecar holds the certificate of ``spiffe://agentmesh.local/client/<name>`` (mTLS is on
in the suite). Policies in these tests match a caller by its SPIFFE ID and by the agent name it
would claim with mTLS off (``sources_for``), so they hold in both modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentmesh import Mesh, Settings, connect
from agentmesh.control.policies import apply_policy
from agentmesh.models import PolicyChange
from agentmesh.sidecar.call import OutboundCall
from agentmesh.sidecar.sidecar import Sidecar
from agentmesh.sidecar.stack import build_outbound
from tests.control.control_process import ControlProcess, arun_cli, cli_env
from tests.mesh_ca import mesh_ca

TRUST_DOMAIN = "agentmesh.local"


def sources_for(name: str) -> list[dict[str, str]]:
    """Selectors matching client ``name`` whether its identity is claimed or verified."""
    return [{"agent": name}, {"spiffe": f"spiffe://{TRUST_DOMAIN}/client/{name}"}]


def access_policy(name: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "agentmesh.dev/v1",
        "kind": "AccessPolicy",
        "metadata": {"name": name},
        "spec": {"rules": list(rules)},
    }


def traffic_policy(name: str, capability: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentmesh.dev/v1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name},
        "spec": {"capability": capability, **spec},
    }


MeshAs = Callable[..., Awaitable[Mesh]]


@pytest.fixture
async def mesh_as(settings: Settings) -> AsyncIterator[MeshAs]:
    """``await mesh_as("planner")`` → a Mesh client that calls as ``planner``."""
    opened: list[Mesh] = []

    async def open_mesh(name: str, **overrides: Any) -> Mesh:
        mesh = await connect(settings, client_name=name, **overrides)
        opened.append(mesh)
        return mesh

    yield open_mesh
    for mesh in opened:
        with contextlib.suppress(Exception):
            await mesh.close()


Apply = Callable[[dict[str, Any]], Awaitable[PolicyChange]]


@pytest.fixture
def apply(mesh: Mesh) -> Apply:
    """Write a policy the way the control plane does (validated, compare-and-set)."""

    async def write(document: dict[str, Any]) -> PolicyChange:
        return await apply_policy(mesh_ca().policy_signer(mesh.sidecar.policies.store), document)

    return write


async def delete(mesh: Mesh, name: str) -> None:
    """Delete a policy the way the control plane does: out of the signed set, then the key."""
    store = mesh.sidecar.policies.store
    latest = await store.latest(name)
    assert latest is not None, f"no policy {name!r} to delete"
    assert latest.operation == "put", f"policy {name!r} is already deleted"
    await mesh_ca().policy_signer(store).sign(name, latest.revision, None)
    await store.delete(name, last=latest.revision)


async def put_signed(mesh: Mesh, name: str, value: bytes) -> int:
    """Store ``value`` under ``name`` unvalidated and sign it into the set, as a control plane
    of another version might have (bytes this sidecar cannot read)."""
    store = mesh.sidecar.policies.store
    latest = await store.latest(name)
    revision = await store.put(name, value, last=latest.revision if latest else 0)
    await mesh_ca().policy_signer(store).sign(name, revision, value)
    return revision


def sidecars_of(*holders: Any) -> list[Sidecar]:
    """The sidecars of Mesh clients and running agents (``RunningAgent``)."""
    out = []
    for holder in holders:
        if isinstance(holder, Mesh):
            out.append(holder.sidecar)
        else:
            assert holder.agent.mesh is not None
            out.append(holder.agent.mesh.sidecar)
    return out


async def until_applied(
    wait_until: Callable[..., Awaitable[float]],
    *holders: Any,
    present: tuple[str, ...] = (),
    absent: tuple[str, ...] = (),
    timeout: float = 5.0,
) -> float:
    """Wait until every sidecar holds the policies in ``present`` and none in ``absent``."""

    def done() -> bool:
        for sidecar in sidecars_of(*holders):
            names = set(sidecar.policies.snapshot.policies) | {
                bad.name for bad in sidecar.policies.snapshot.invalid
            }
            if not set(present) <= names or names & set(absent):
                return False
        return True

    return await wait_until(done, timeout=timeout)


async def call_unchecked(holder: Any, settings: Settings, capability: str) -> Any:
    """Call through the sidecar of ``holder`` (a Mesh or a running agent) without its own
    sending-side policy check.

    The call reaches the receiving sidecar, whose decision is the authoritative one: this is
    how a test sees that the receiver enforces on its own. It uses the holder's transport, so
    it carries the holder's identity (its mTLS certificate; with mTLS off, its claimed name).
    """
    [sidecar] = sidecars_of(holder)
    caller = "client" if isinstance(holder, Mesh) else holder.agent.name
    stack = build_outbound(sidecar.index, sidecar.transport, settings, caller=caller)
    loop = asyncio.get_running_loop()
    call = OutboundCall(capability=capability, body=b"{}", deadline=loop.time() + 5, timeout=5)
    reply = await stack.handler(call)
    return json.loads(reply.body)


# --------------------------------------------------------------------------------------
# A control plane process (for the API, the CLI, and "the control plane is gone").
# --------------------------------------------------------------------------------------


@pytest.fixture
def control(nats_url: str, bucket: str, tmp_path: Path) -> Iterator[ControlProcess]:
    """``agentmesh control`` on the test's NATS and bucket, with the suite's mesh CA, so its
    identities and the in-process sidecars' trust each other."""
    env = {"AGENTMESH_REGISTRY_BUCKET": bucket, **mesh_ca().env()}
    proc = ControlProcess(tmp_path, env, nats_url=nats_url)
    try:
        yield proc.start()
    finally:
        proc.close()


async def run_cli(
    *args: str, control: ControlProcess, stdin: str | None = None
) -> tuple[int, str, str]:
    """``python -m agentmesh ARGS`` against ``control`` (whose data dir holds the admin
    token); (exit code, stdout, stderr)."""
    env = {"AGENTMESH_CONTROL_URL": control.url, "AGENTMESH_DATA_DIR": str(control.workdir)}
    done = await arun_cli(*args, env=cli_env(env), stdin=stdin)
    return done.returncode, done.stdout, done.stderr
