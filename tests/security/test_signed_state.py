"""Signed mesh state: what a writer of NATS can no longer grant (issue 11, items 3 and 4).

Every attack here writes to NATS over the test's own connection, which may write anything: it
stands for an operator-run NATS with loose permissions (or a stolen credential). What it writes
must be ignored and logged, and the last good state kept: forged, unsigned, badly signed and
rolled-back revocation lists and join-token records, a trust bundle signed by a leaf, and
registry records whose signer is not the agent they name. Revoking by serial needs no record of
the certificate's issuance, and a serial is never read as a name.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agentmesh import AuthenticationFailed, Mesh, Settings, capability, connect
from agentmesh.control.ca import CertificateAuthority
from agentmesh.control.issuer import Issuer
from agentmesh.control.policies import apply_policy
from agentmesh.control.policyset import PolicySigner
from agentmesh.errors import InvalidInput
from agentmesh.models import (
    AgentRecord,
    CertificateRequest,
    JoinTokenRequest,
    RevocationList,
    RevocationRequest,
    SignedState,
    StoredToken,
    TrustBundle,
)
from agentmesh.nats_server import NatsServer
from agentmesh.policy.store import SET_KEY
from agentmesh.registry import Lease
from agentmesh.registry.store import record_key
from agentmesh.security.enrol import parse_token, token_digest
from agentmesh.security.pki import new_csr, new_key, pem, sign_bundle, verify_bundle
from agentmesh.security.signed import sign_state
from agentmesh.security.store import REVOCATIONS_KEY
from tests.conftest import StartAgent, WaitUntil
from tests.mesh_ca import mesh_ca

from .conftest import SpawnJoined, StartControl
from .forge import TD, forge

# ---- helpers ---------------------------------------------------------------------------------


@capability
async def echo(text: str = "") -> str:
    return text


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


def leaf_signed(document: RevocationList, version: int) -> SignedState:
    """A revocation list signed by an ordinary mesh leaf (no CA), chained to the real root."""
    ca = mesh_ca().ca
    key, leaf = forge(ca._key, ca.signer, uris=(f"spiffe://{TD}/agent/mallory",))
    return sign_state("revocations", version, document, key, leaf)


def other_ca_signed(document: RevocationList, version: int, tmp_path: Path) -> SignedState:
    """Signed by a CA certificate the mesh never trusted."""
    other = CertificateAuthority.in_directory(tmp_path / "other-ca", TD, 3600)
    return other.sign_state("revocations", version, document)


def tampered(state: SignedState) -> SignedState:
    """``state`` with its document changed after signing (an entry dropped)."""
    document = RevocationList.model_validate_json(state.payload)
    return state.model_copy(
        update={"payload": document.model_copy(update={"revoked": []}).model_dump_json()}
    )


# ---- revocations -----------------------------------------------------------------------------


async def test_forged_unsigned_and_rolled_back_revocation_lists_are_ignored_and_logged(
    mesh: Mesh,
    settings: Settings,
    nats_server: NatsServer,
    wait_until: WaitUntil,
    caplog,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.WARNING, logger="agentmesh.security")
    identity = mesh.sidecar.identity
    assert identity.store is not None
    kv = identity.store.kv
    issuer = Issuer(mesh_ca().ca, identity.store)  # what the control plane runs
    first = await issuer.revoke(RevocationRequest(target="1a2b3c", kind="serial"))
    assert first.revoked[0].spiffe_id is None  # no record of it: revoked all the same
    await wait_until(lambda: 0x1A2B3C in identity.revoked)
    older = (await kv.get(REVOCATIONS_KEY)).value
    await issuer.revoke(RevocationRequest(target="0x4d5e6f"))
    await wait_until(lambda: 0x4D5E6F in identity.revoked)
    in_force = identity.revoked
    current = SignedState.model_validate_json((await kv.get(REVOCATIONS_KEY)).value)
    empty = RevocationList()
    later = current.version + 1_000_000

    attacks: list[tuple[bytes | None, str]] = [
        (empty.model_dump_json().encode(), "not a signed revocations document"),
        (leaf_signed(empty, later).model_dump_json().encode(), "is not a CA certificate"),
        (
            other_ca_signed(empty, later, tmp_path).model_dump_json().encode(),
            "does not chain to a trusted root",
        ),
        (tampered(current).model_dump_json().encode(), "bad signature"),
        (older, "older than"),  # a replay of the CA's own earlier list: a rollback
        (
            mesh_ca().ca.sign_state("policies", later, empty).model_dump_json().encode(),
            "a signed policies document where revocations belongs",
        ),
        (None, "the revocation list was deleted from NATS"),
    ]
    for value, reason in attacks:
        caplog.clear()
        if value is None:
            await kv.delete(REVOCATIONS_KEY)
        else:
            await kv.put(REVOCATIONS_KEY, value)
        await wait_until(lambda reason=reason: logged(caplog, reason))
        assert identity.revoked == in_force, reason
        assert identity.view.version == current.version
        # The control plane reads it the same way (before renewing or enrolling anyone).
        listed = {r.serial for r in (await issuer.revocation_list()).revoked}
        assert listed == {"1a2b3c", "4d5e6f"}, reason

    # After a reconnection the watch starts again from a snapshot without the list: kept.
    caplog.clear()
    nats_server.stop()
    nats_server.start()
    await wait_until(lambda: logged(caplog, "the revocation list was deleted"), timeout=15)
    assert identity.revoked == in_force

    # A sidecar that starts now has no good list to keep; the control plane writes its last
    # good one back, and from then on new sidecars enforce it too.
    async with connect(settings) as early:
        assert early.sidecar.identity.revoked == frozenset()
    await issuer.guard()
    restored = SignedState.model_validate_json((await kv.get(REVOCATIONS_KEY)).value)
    assert restored == current
    async with connect(settings) as late:
        assert late.sidecar.identity.revoked == in_force


async def test_a_deleted_revocation_stays_enforced_by_a_real_agent(
    start_control: StartControl, spawn_joined: SpawnJoined, joined_mesh, wait_until: WaitUntil
) -> None:
    control = start_control()
    agent = await spawn_joined(control.env(), name="echoer")
    mallory = await joined_mesh(control, client_name="mallory")
    assert await mallory.call("echo", {"text": "before"}) == "before"
    serial = f"{mallory.sidecar.identity.serial:x}"
    code, out, err = await control.cli("identity", "revoke", "--serial", serial)
    assert code == 0, err
    assert f"revoked {serial}" in out

    async def refused() -> bool:
        try:
            await mallory.call("echo", {"text": "after"}, retries=0)
        except AuthenticationFailed as exc:
            return f"certificate {serial} is revoked" in str(exc)
        return False

    await wait_until(refused, timeout=5.0)
    # An attacker with write access to NATS deletes the revocation list, and then purges it.
    store = mallory.sidecar.identity.store
    assert store is not None
    await store.kv.delete(REVOCATIONS_KEY)
    await store.kv.purge(REVOCATIONS_KEY)
    await asyncio.sleep(0.5)  # every watch has seen the deletion by now
    assert await refused()
    assert await refused()  # a new connection too: mallory's pool dropped the refused one
    assert agent.returncode is None
    assert "the revocation list was deleted from NATS" in agent.tail(200)


async def test_revoking_a_serial_needs_no_issuance_record_and_never_guesses(
    start_control: StartControl, joined_mesh, wait_until: WaitUntil
) -> None:
    control = start_control()
    victim = await joined_mesh(control, client_name="victim")
    serial = f"{victim.sidecar.identity.serial:x}"
    store = victim.sidecar.identity.store
    assert store is not None
    await store.open_private()  # the control plane's bucket (an open NATS: anyone may)
    await store.ca_kv.delete(f"ca.issued.{serial}")  # the issuance record is gone

    # Something that could be a serial or a name is refused, saying why.
    code, out, err = await control.cli("identity", "revoke", "cafe")
    assert code != 0
    assert "could be a certificate serial or an agent name" in out + err
    assert "--serial cafe" in out + err
    code, out, err = await control.cli("identity", "revoke", "x", "--serial", "ab")
    assert code != 0
    assert "one TARGET, or --serial SERIAL, or --name NAME" in out + err

    code, out, err = await control.cli("identity", "revoke", "--serial", serial, "-o", "json")
    assert code == 0, err
    [revocation] = json.loads(out)["revoked"]
    assert revocation["serial"] == serial
    assert revocation["spiffe_id"] is None
    # It stays listed as long as any certificate of this CA can live.
    lifetime = datetime.fromisoformat(revocation["not_after"]) - datetime.now(UTC)
    assert timedelta(hours=23) < lifetime <= timedelta(hours=24, minutes=1)
    await wait_until(lambda: victim.sidecar.identity.serial in victim.sidecar.identity.revoked)


# ---- the trust bundle --------------------------------------------------------------------------


def test_a_bundle_signed_by_a_leaf_is_refused(tmp_path: Path) -> None:
    ca = mesh_ca().ca
    attacker = CertificateAuthority.in_directory(tmp_path / "attacker", TD, 3600)
    bundle = TrustBundle(
        trust_domain=TD,
        version=ca.bundle.version + 1,
        roots=[*ca.bundle.roots, pem(attacker.signer)],
        issued_at=datetime.now(UTC),
    )
    key, leaf = forge(ca._key, ca.signer)  # a real mesh leaf, chained to the trusted root
    with pytest.raises(ValueError, match="is not a CA certificate"):
        verify_bundle(sign_bundle(bundle, key, leaf), ca.roots)
    # The same bundle signed by the CA is taken (the check is the signer, not the bundle).
    verify_bundle(sign_bundle(bundle, ca._key, ca.signer), ca.roots)


async def test_a_sidecar_ignores_a_leaf_signed_bundle_in_nats(
    mesh: Mesh, wait_until: WaitUntil, caplog, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING, logger="agentmesh.security")
    identity = mesh.sidecar.identity
    assert identity.store is not None
    ca = mesh_ca().ca
    attacker = CertificateAuthority.in_directory(tmp_path / "attacker", TD, 3600)
    before = identity.bundle_version
    bundle = TrustBundle(
        trust_domain=TD,
        version=before + 10,
        roots=[pem(attacker.signer)],  # only the attacker's root: every real peer refused
        issued_at=datetime.now(UTC),
    )
    key, leaf = forge(ca._key, ca.signer)
    await identity.store.put_bundle(sign_bundle(bundle, key, leaf))
    await wait_until(lambda: logged(caplog, "is not a CA certificate"))
    assert identity.bundle_version == before
    assert logged(caplog, f"ignoring trust bundle v{before + 10} from KV")


# ---- join tokens -----------------------------------------------------------------------------


async def test_forged_copied_and_rolled_back_token_records_enrol_nobody(mesh: Mesh, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agentmesh.security")
    assert mesh.sidecar.identity.store is not None
    store = mesh.sidecar.identity.store
    issuer = Issuer(mesh_ca().ca, store)

    def request(token: str, name: str = "summarizer") -> CertificateRequest:
        csr = new_csr(new_key(), f"spiffe://{TD}/agent/{name}")
        text = csr.public_bytes(serialization.Encoding.PEM).decode()
        return CertificateRequest(csr=text, token=token)

    # A token hash written straight into the bucket: unsigned, so no token.
    forged = "amt1." + "0" * 32 + "." + base64.urlsafe_b64encode(b"x" * 32).decode().rstrip("=")
    digest = token_digest(parse_token(forged)[1])
    stored = StoredToken(digest=digest, identity="*", created_at=datetime.now(UTC))
    await store.open_private()  # the control plane's bucket (an open NATS: anyone may)
    await store.ca_kv.put(f"ca.token.{digest}", stored.model_dump_json().encode())
    with pytest.raises(AuthenticationFailed, match="unknown, expired or used up"):
        await issuer.certificate(request(forged))
    assert logged(caplog, "not a signed token document")

    # The control plane's own signed record of a real token, copied under the forged hash.
    real = await issuer.create_token(JoinTokenRequest(agent="summarizer", uses=2))
    real_digest = token_digest(parse_token(real.token)[1])
    original = (await store.ca_kv.get(f"ca.token.{real_digest}")).value
    await store.ca_kv.put(f"ca.token.{digest}", original)
    with pytest.raises(AuthenticationFailed, match="unknown, expired or used up"):
        await issuer.certificate(request(forged))
    assert logged(caplog, "copied")

    # A used token's earlier record written back (two uses again): a rollback.
    issued = await issuer.certificate(request(real.token))
    assert issued.spiffe_id == f"spiffe://{TD}/agent/summarizer"
    await store.ca_kv.put(f"ca.token.{real_digest}", original)
    with pytest.raises(AuthenticationFailed):
        await issuer.certificate(request(real.token))
    assert logged(caplog, "(a rollback)")


# ---- registry records ---------------------------------------------------------------------------


async def test_a_record_signed_by_another_agent_is_ignored_by_the_index(
    start_agent: StartAgent, mesh: Mesh, wait_until: WaitUntil, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="agentmesh.registry")
    real = await start_agent([echo], name="echoer")
    conn, bucket = mesh.sidecar.conn, mesh.sidecar.store.bucket
    # Agent "mallory" holds a real mesh certificate, and claims to be "echoer".
    as_mallory = await mesh_ca().store_as(conn, bucket, "mallory")
    claim = AgentRecord(
        instance_id="echoer-fake",
        name="echoer",
        identity=f"spiffe://{TD}/agent/echoer",
        mtls="strict",
        endpoint="https://127.0.0.1:9",
        capabilities=(echo.spec,),
    )
    lease = Lease(as_mallory, claim, interval=0.25, ttl=1)
    await lease.acquire()
    # And an unsigned record that claims an identity (no workload key behind it).
    unsigned = claim.model_copy(update={"instance_id": "echoer-unsigned"})
    await mesh.sidecar.store.kv.put(record_key(unsigned), unsigned.model_dump_json().encode())
    try:
        await wait_until(
            lambda: logged(caplog, "'echoer.echoer-fake'") and logged(caplog, "is not signed")
        )
        assert logged(caplog, f"but is signed by spiffe://{TD}/agent/mallory")
        ids = {t.instance_id for t in mesh.sidecar.index.targets("echo")}
        assert ids == {real.instance_id}

        # Logged once per index (the client's and the agent's, in this process), not at every
        # renewal of the same bytes.
        def times() -> int:
            return sum("'echoer.echoer-fake'" in r.getMessage() for r in caplog.records)

        await wait_until(lambda: times() == 2)
        renewals = lease.renewals
        await wait_until(lambda: lease.renewals >= renewals + 3)
        assert times() == 2
        assert await mesh.call("echo", {"text": "real"}) == "real"
    finally:
        await lease.release()


async def test_signed_records_renew_as_the_same_bytes(
    mesh: Mesh, start_agent: StartAgent, wait_until: WaitUntil
) -> None:
    """A renewal rewrites identical bytes (deterministic signatures): watchers skip it."""
    agent = await start_agent([echo], name="echoer")
    kv = mesh.sidecar.store.kv
    first = await kv.get(f"echoer.{agent.instance_id}")
    assert first.value is not None
    assert b"\n" in first.value  # the record, then its proof

    async def renewed() -> bool:
        return (await kv.get(f"echoer.{agent.instance_id}")).revision != first.revision

    await wait_until(renewed)
    assert (await kv.get(f"echoer.{agent.instance_id}")).value == first.value


def test_a_revocation_names_what_it_could_be() -> None:
    """``auto`` reads only unambiguous syntax; a name-or-serial string is an error."""
    issuer = Issuer(mesh_ca().ca, None)  # type: ignore[arg-type]
    assert issuer._target(RevocationRequest(target="0xCAFE")) == ("serial", "cafe")
    assert issuer._target(RevocationRequest(target="cafe", kind="serial")) == ("serial", "cafe")
    assert issuer._target(RevocationRequest(target="cafe", kind="name")) == (
        "identity",
        f"spiffe://{TD}/agent/cafe",
    )
    assert issuer._target(RevocationRequest(target="summarizer")) == (
        "identity",
        f"spiffe://{TD}/agent/summarizer",
    )
    assert issuer._target(RevocationRequest(target=f"spiffe://{TD}/client/bob")) == (
        "identity",
        f"spiffe://{TD}/client/bob",
    )
    for ambiguous in ("cafe", "123", "7dbd0b6e16073d1e0b209f3177cb9334519af90b"):
        with pytest.raises(InvalidInput, match="could be a certificate serial or an agent name"):
            issuer._target(RevocationRequest(target=ambiguous))
    with pytest.raises(InvalidInput, match="is not a certificate serial"):
        issuer._target(RevocationRequest(target="summarizer", kind="serial"))


async def test_a_restarted_control_plane_starts_from_the_state_it_kept(
    mesh: Mesh, tmp_path: Path
) -> None:
    """State deleted while the control plane was down is not lost at its next write."""
    store = mesh.sidecar.identity.store
    assert store is not None
    kept = tmp_path / "state"
    before = Issuer(mesh_ca().ca, store)
    before.keep_in(kept)
    await before.revoke(RevocationRequest(target="0xabc"))
    await store.kv.delete(REVOCATIONS_KEY)  # meanwhile, in NATS
    after = Issuer(mesh_ca().ca, store)  # a restart: nothing in memory
    after.keep_in(kept)
    await after.revoke(RevocationRequest(target="0xdef"))
    assert {r.serial for r in (await after.revocation_list()).revoked} == {"abc", "def"}

    policies = mesh.sidecar.policies.store

    def manifest(name: str) -> dict[str, object]:
        rule = {"name": "r", "action": "deny", "sources": [{"agent": "x"}]}
        return {
            "apiVersion": "agentmesh.dev/v1",
            "kind": "AccessPolicy",
            "metadata": {"name": name},
            "spec": {"rules": [{**rule, "targets": [{"capability": "c"}]}]},
        }

    await apply_policy(PolicySigner(policies, mesh_ca().ca, kept_in=kept), manifest("first"))
    latest = await policies.latest(SET_KEY)
    assert latest is not None
    await policies.delete(SET_KEY, last=latest.revision)  # meanwhile, in NATS
    restarted = PolicySigner(policies, mesh_ca().ca, kept_in=kept)
    await apply_policy(restarted, manifest("second"))
    assert set((await restarted.current())[0].policies) == {"first", "second"}
