"""What ``POST /v1/certificates`` accepts, on a real NATS KV bucket: tokens and renewal proofs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agentmesh.control.ca import CertificateAuthority
from agentmesh.control.issuer import Issuer
from agentmesh.errors import AuthenticationFailed, InvalidInput, PolicyDenied
from agentmesh.models import (
    CertificateRequest,
    IdentityRecord,
    JoinTokenRequest,
    RevocationRequest,
    StoredToken,
)
from agentmesh.registry import NatsConnection
from agentmesh.security.enrol import renewal_proof
from agentmesh.security.identity import SpiffeId
from agentmesh.security.pki import load_certs, new_csr, new_key
from agentmesh.security.store import SecurityStore
from tests.mesh_ca import mesh_ca

from .forge import TD, forge


@pytest.fixture
async def issuer(nats_url: str, bucket: str, tmp_path: Path) -> AsyncIterator[Issuer]:
    conn = NatsConnection(nats_url, name="issuer-test")
    await conn.connect()
    store = SecurityStore(conn, f"{bucket}_security")
    await store.open()
    yield Issuer(CertificateAuthority.in_directory(tmp_path / "ca", TD, ttl=600), store)
    await conn.close()


def csr_for(identity: str) -> tuple[object, str]:
    key = new_key()
    csr = new_csr(key, identity)
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_tokens_enrol_their_identity_once(issuer: Issuer) -> None:
    token = await issuer.create_token(JoinTokenRequest(agent="worker", uses=1))
    _, csr = csr_for(f"spiffe://{TD}/agent/worker")
    issued = await issuer.certificate(CertificateRequest(csr=csr, token=token.token))
    assert issued.spiffe_id == f"spiffe://{TD}/agent/worker"
    with pytest.raises(AuthenticationFailed, match="unknown, expired or used up"):
        await issuer.certificate(CertificateRequest(csr=csr, token=token.token))
    other = await issuer.create_token(JoinTokenRequest(agent="worker", uses=None))
    _, wrong = csr_for(f"spiffe://{TD}/agent/payroll")
    with pytest.raises(PolicyDenied, match="enrols spiffe://agentmesh.local/agent/worker"):
        await issuer.certificate(CertificateRequest(csr=wrong, token=other.token))
    _, control = csr_for(f"spiffe://{TD}/control")
    with pytest.raises(PolicyDenied, match="never issued"):
        await issuer.certificate(CertificateRequest(csr=control, token=other.token))
    _, foreign = csr_for("spiffe://elsewhere.example/agent/worker")
    with pytest.raises(PolicyDenied, match="outside this CA's trust domain"):
        await issuer.certificate(CertificateRequest(csr=foreign, token=other.token))
    with pytest.raises(AuthenticationFailed, match="join token or a renewal proof"):
        await issuer.certificate(CertificateRequest(csr=csr))
    with pytest.raises(InvalidInput, match="unreadable CSR"):
        await issuer.certificate(CertificateRequest(csr="-----BEGIN nothing", token=token.token))


async def test_renewal_is_authenticated_by_the_current_key_and_certificate(issuer: Issuer) -> None:
    identity = f"spiffe://{TD}/agent/worker"
    key, csr = csr_for(identity)
    token = await issuer.create_token(JoinTokenRequest(agent="worker"))
    issued = await issuer.certificate(CertificateRequest(csr=csr, token=token.token))
    current = load_certs(issued.certificate)
    new_private = new_key()
    request = new_csr(new_private, identity)
    request_pem = request.public_bytes(serialization.Encoding.PEM).decode()

    def renewal(**changes: object) -> CertificateRequest:
        proof = renewal_proof(key, current, request)  # type: ignore[arg-type]
        return CertificateRequest(csr=request_pem, renewal=proof.model_copy(update=changes))

    renewed = await issuer.certificate(renewal())
    assert renewed.spiffe_id == identity
    assert renewed.serial != issued.serial

    # Signed by another key: refused.
    impostor = renewal_proof(new_key(), current, request)
    with pytest.raises(AuthenticationFailed, match="not signed by the current"):
        await issuer.certificate(CertificateRequest(csr=request_pem, renewal=impostor))
    # A stale proof (replayed much later): refused.
    with pytest.raises(AuthenticationFailed, match="too far from our clock"):
        await issuer.certificate(renewal(timestamp=datetime.now(UTC) - timedelta(hours=1)))
    # A certificate from another CA: refused.
    other = CertificateAuthority.in_directory(Path(issuer.ca.directory or ".").parent / "x", TD, 60)
    fkey, fcert = forge(other._key, other.signer, uris=(identity,))
    forged = renewal_proof(fkey, [fcert], request)
    with pytest.raises(AuthenticationFailed, match="not from this CA"):
        await issuer.certificate(CertificateRequest(csr=request_pem, renewal=forged))
    # Renewing into another identity: refused.
    _, payroll = csr_for(f"spiffe://{TD}/agent/payroll")
    swap = renewal_proof(key, current, new_csr(new_key(), f"spiffe://{TD}/agent/payroll"))
    with pytest.raises((PolicyDenied, AuthenticationFailed)):
        await issuer.certificate(CertificateRequest(csr=payroll, renewal=swap))
    # A revoked certificate cannot renew itself.
    await issuer.revoke(RevocationRequest(target=issued.serial, kind="serial"))
    with pytest.raises(AuthenticationFailed, match="is revoked"):
        await issuer.certificate(renewal())


async def test_identities_list_what_was_issued_and_revoked(issuer: Issuer) -> None:
    public = new_key().public_key()
    first = await issuer._issue(public, SpiffeId.agent(TD, "a"), "local")
    await issuer._issue(public, SpiffeId.client(TD, "alice"), "local")
    result = await issuer.revoke(RevocationRequest(target="a", kind="name"))
    assert [r.serial for r in result.revoked] == [first.serial]
    listed = {(r.spiffe_id, r.revoked) for r in await issuer.identities()}
    assert listed == {(f"spiffe://{TD}/agent/a", True), (f"spiffe://{TD}/client/alice", False)}
    with pytest.raises(InvalidInput, match="is not an agent name"):
        await issuer.revoke(RevocationRequest(target="Not A Name!"))


async def test_records_left_in_the_public_bucket_move_to_the_control_planes_own(
    nats_url: str, bucket: str
) -> None:
    """A control plane from before the split kept issued certificates and token records in the
    bucket every member reads: opening the private one moves them there, once."""
    conn = NatsConnection(nats_url, name="split-test")
    await conn.connect()
    try:
        store = SecurityStore(conn, f"{bucket}_security")
        await store.open()
        now = datetime.now(UTC)
        record = IdentityRecord(
            spiffe_id=f"spiffe://{TD}/agent/worker",
            serial="1f",
            not_before=now,
            not_after=now + timedelta(hours=1),
            issued_at=now,
            via="token",
        )
        token = StoredToken(
            digest="ab" * 32, identity="*", created_at=now, expires_at=now + timedelta(hours=1)
        )
        signed = mesh_ca().ca.sign_state("token", 1, token)
        await store.kv.put("ca.issued.1f", record.model_dump_json().encode())
        await store.kv.put(f"ca.token.{'ab' * 32}", signed.model_dump_json().encode())
        await store.kv.put("pub.bundle", b"{}")
        await store.open_private()
        assert sorted(await store.ca_kv.keys()) == ["ca.issued.1f", f"ca.token.{'ab' * 32}"]
        assert await store.kv.keys() == ["pub.bundle"]
        assert await store.issued() == [record]
    finally:
        await conn.close()


async def test_agent_names_of_the_mesh_roles_are_reserved(issuer: Issuer) -> None:
    """An agent named "client" or "control" would publish on the clients' or the control
    plane's telemetry subjects: neither a token nor a certificate is made for one."""
    with pytest.raises(PolicyDenied, match="agent name 'control' is reserved"):
        await issuer.create_token(JoinTokenRequest(agent="control"))
    token = await issuer.create_token(JoinTokenRequest(agent="worker", uses=None))
    _, csr = csr_for(f"spiffe://{TD}/agent/client")
    with pytest.raises(PolicyDenied, match="agent name 'client' is reserved"):
        await issuer.certificate(CertificateRequest(csr=csr, token=token.token))
