"""Policies are enforced as the control plane signed them, whatever else is written to NATS.

The test's own connection stands for a writer of NATS around the control plane (an operator NATS
with loose permissions): it overwrites, adds and deletes policy keys and the signed policy set.
Every sidecar keeps enforcing the last signed state, and says why in its log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from agentmesh import Mesh, PolicyDenied, capability, connect
from agentmesh.control.ca import CertificateAuthority
from agentmesh.models import PolicySet
from agentmesh.policy.store import SET_KEY, policy_digest
from agentmesh.security.signed import sign_state
from tests.mesh_ca import mesh_ca
from tests.security.forge import forge

from .conftest import TRUST_DOMAIN, access_policy, sources_for, until_applied

RUNS: dict[str, int] = {}


@capability
async def summarize(text: str = "") -> str:
    RUNS["summarize"] = RUNS.get("summarize", 0) + 1
    return text[:5]


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_policies_written_around_the_control_plane_change_nothing_enforced(
    start_agent, mesh_as, mesh: Mesh, settings, wait_until, caplog, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="agentmesh.policy")
    server = await start_agent([summarize], name="summarizer")
    planner, intruder = await mesh_as("planner"), await mesh_as("intruder")
    everyone = (server, planner, intruder, mesh)
    store = mesh.sidecar.policies.store
    signer = mesh_ca().policy_signer(store)  # the control plane's, with its memory
    from agentmesh.control.policies import apply_policy

    await apply_policy(
        signer,
        access_policy(
            "warmup",
            {
                "name": "anyone",
                "action": "allow",
                "sources": sources_for("planner"),
                "targets": [{"capability": "other"}],
            },
        ),
    )
    older_set = (await store.latest(SET_KEY)).value  # type: ignore[union-attr]
    policy = access_policy(
        "summarize-access",
        {
            "name": "planner-only",
            "action": "allow",
            "sources": sources_for("planner"),
            "targets": [{"capability": "summarize"}],
        },
    )
    await apply_policy(signer, policy)
    await until_applied(wait_until, *everyone, present=("summarize-access",))

    async def enforced() -> None:
        assert await planner.call("summarize", {"text": "hello"}) == "hello"
        with pytest.raises(PolicyDenied, match="planner-only"):
            await intruder.call("summarize")

    await enforced()
    signed_set, _ = await signer.current()
    assert set(signed_set.policies) == {"warmup", "summarize-access"}
    sidecar = server.agent.mesh.sidecar
    signed_version = sidecar.policies.set_version
    wide_open = json.loads(json.dumps(policy))
    wide_open["spec"]["rules"][0]["sources"].append(
        {"spiffe": f"spiffe://{TRUST_DOMAIN}/client/intruder"}
    )
    forged_bytes = json.dumps(wide_open).encode()
    ca = mesh_ca().ca
    leaf_key, leaf = forge(ca._key, ca.signer)
    other = CertificateAuthority.in_directory(tmp_path / "other", TRUST_DOMAIN, 3600)
    listing_forged = PolicySet(
        policies={"summarize-access": policy_digest(forged_bytes), "warmup": "0" * 64}
    )
    later = signed_version + 1_000_000

    async def put(key: str, value: bytes) -> None:
        latest = await store.latest(key)
        await store.put(key, value, last=latest.revision if latest else 0)

    attacks: list[tuple[str, bytes | None, str]] = [
        ("summarize-access", forged_bytes, "is different, not what the signed set lists"),
        ("intruder-allow", forged_bytes, "ignoring policy 'intruder-allow'"),
        ("summarize-access", None, "is gone, not what the signed set lists"),
        (SET_KEY, listing_forged.model_dump_json().encode(), "not a signed policies document"),
        (
            SET_KEY,
            sign_state("policies", later, listing_forged, leaf_key, leaf)
            .model_dump_json()
            .encode(),
            "is not a CA certificate",
        ),
        (
            SET_KEY,
            other.sign_state("policies", later, listing_forged).model_dump_json().encode(),
            "does not chain to a trusted root",
        ),
        (SET_KEY, older_set or b"", "older than"),  # the CA's own earlier set: a rollback
        (SET_KEY, None, "the signed policy set was deleted from NATS"),
    ]
    for key, value, reason in attacks:
        caplog.clear()
        if value is None:
            latest = await store.latest(key)
            assert latest is not None
            await store.delete(key, last=latest.revision)
        else:
            await put(key, value)
        await wait_until(lambda reason=reason: logged(caplog, reason), timeout=5)
        await enforced()
        assert sidecar.policies.set_version == signed_version
        assert "intruder-allow" not in sidecar.policies.snapshot.policies
        # The control plane reads the set the same way before it signs the next one.
        assert (await signer.current())[0] == signed_set

    # A sidecar that starts now never saw the deleted policy's signed bytes: it fails closed.
    async with connect(settings, client_name="planner") as newcomer:
        with pytest.raises(PolicyDenied, match="fails closed"):
            await newcomer.call("summarize", {"text": "x"})
    # The control plane writes back the set and the policy (from the key's history) ...
    await signer.guard()
    latest = await store.latest("summarize-access")
    assert latest is not None
    assert latest.operation == "put"
    assert json.loads(latest.value) == json.loads(
        (await signer.store.history("summarize-access"))[0].value
    )
    # ... and from then on a new sidecar enforces it as signed.
    async with connect(settings, client_name="planner") as newcomer:
        await wait_until(lambda: "summarize-access" in newcomer.sidecar.policies.snapshot.policies)
        assert await newcomer.call("summarize", {"text": "again"}) == "again"
    await enforced()


async def test_policies_stored_before_signing_are_adopted_once(
    mesh: Mesh, settings, wait_until
) -> None:
    """An upgrade from a version that did not sign: the first start signs what it finds; a
    set deleted later is never replaced by signing whatever is stored."""
    store = mesh.sidecar.policies.store
    old = access_policy(
        "from-before",
        {
            "name": "r",
            "action": "deny",
            "sources": [{"agent": "x"}],
            "targets": [{"capability": "c"}],
        },
    )
    await store.put("from-before", json.dumps(old).encode(), last=0)
    # A sidecar that (re)synchronises now sees policies but no signed set: it fails closed.
    async with connect(settings, client_name="early") as early:
        assert [bad.name for bad in early.sidecar.policies.snapshot.invalid] == ["from-before"]
    signer = mesh_ca().policy_signer(store)
    await signer.adopt()
    await wait_until(lambda: "from-before" in mesh.sidecar.policies.snapshot.policies)
    latest = await store.latest(SET_KEY)
    assert latest is not None
    await store.delete(SET_KEY, last=latest.revision)
    await store.put("planted", json.dumps(old).encode(), last=0)
    await mesh_ca().policy_signer(store).adopt()  # a restart: a deleted set is no upgrade
    entry = await store.latest(SET_KEY)
    assert entry is not None
    assert entry.operation == "delete"
