"""A client's certificate reused across runs: kept while fresh, dropped when near expiry or revoked."""

from __future__ import annotations

import time
from pathlib import Path

from agentmesh import Settings, capability, connect
from agentmesh.control.ca import CertificateAuthority, write_root_ca
from agentmesh.control.issuer import Issuer
from agentmesh.models import IssuedCertificate, RevocationRequest
from agentmesh.security import client_cache
from agentmesh.security.identity import SpiffeId
from agentmesh.security.pki import new_key, pem
from agentmesh.security.workload import default_client_name
from tests.mesh_ca import TRUST_DOMAIN, mesh_ca


@capability
async def hello() -> str:
    return "hi"


def _cached(tmp_path: Path, name: str = "alice") -> tuple[Path, float, float]:
    """A certificate of client ``name`` saved in the cache: (file, issued at, not after)."""
    ca = mesh_ca().ca
    key = new_key()
    cert = ca.issue(key.public_key(), SpiffeId.client(TRUST_DOMAIN, name), ttl=3600)
    issued_at = time.time()
    path = tmp_path / "client-certs" / f"{name}.json"
    issued = IssuedCertificate(
        spiffe_id=f"spiffe://{TRUST_DOMAIN}/client/{name}",
        serial=f"{cert.serial_number:x}",
        certificate=pem(cert),
        not_after=cert.not_valid_after_utc,
        trust_bundle=ca.bundle,
    )
    client_cache.save(path, key, issued, issued_at)
    return path, issued_at, cert.not_valid_after_utc.timestamp()


def test_a_cached_certificate_is_reused_until_half_its_life_is_left(tmp_path: Path) -> None:
    path, issued_at, not_after = _cached(tmp_path)
    half = issued_at + (not_after - issued_at) / 2
    cached = client_cache.load(path, "alice", now=half - 60)
    assert cached is not None
    assert cached.certs[0].serial_number > 0
    assert cached.bundle.trust_domain == TRUST_DOMAIN
    assert client_cache.load(path, "alice", now=half + 60) is None, "renewed near expiry"


def test_a_foreign_or_damaged_cache_is_ignored(tmp_path: Path) -> None:
    path, _, _ = _cached(tmp_path, "alice")
    assert client_cache.load(path, "bob") is None, "another client's certificate"
    path.write_text(path.read_text()[:-40])
    assert client_cache.load(path, "alice") is None
    assert client_cache.load(tmp_path / "missing.json", "alice") is None


async def test_connect_reuses_its_certificate_and_drops_a_revoked_one(
    settings: Settings, tmp_path: Path
) -> None:
    async with connect(settings) as mesh:
        first = mesh.sidecar.identity.serial
    async with connect(settings) as mesh:
        assert mesh.sidecar.identity.serial == first, "the second run reuses the certificate"
        store = mesh.sidecar.identity.store
        assert store is not None
        await Issuer(mesh_ca().ca, store).revoke(
            RevocationRequest(target=f"{first:x}", kind="serial", reason="test")
        )
    async with connect(settings) as mesh:
        second = mesh.sidecar.identity.serial
        assert second != first, "a revoked certificate is not reused"
    async with connect(settings) as mesh:
        assert mesh.sidecar.identity.serial == second
    [cache] = (tmp_path / "client-certs").iterdir()
    assert cache.stat().st_mode & 0o777 == 0o600


async def test_a_cached_certificate_of_another_ca_is_replaced(
    settings: Settings, tmp_path: Path, start_agent
) -> None:
    """The mesh's CA changed since the last run (a new control plane): enrol again, and work."""
    other = CertificateAuthority.from_files(
        *write_root_ca(tmp_path / "old-ca", TRUST_DOMAIN), TRUST_DOMAIN, ttl=3600
    )
    key = new_key()
    name = default_client_name()
    cert = other.issue(key.public_key(), SpiffeId.client(TRUST_DOMAIN, name))
    stale = IssuedCertificate(
        spiffe_id=f"spiffe://{TRUST_DOMAIN}/client/{name}",
        serial=f"{cert.serial_number:x}",
        certificate=pem(cert),
        not_after=cert.not_valid_after_utc,
        trust_bundle=other.bundle,
    )
    client_cache.save(client_cache.cache_path(settings, name), key, stale, time.time())

    await start_agent([hello], name="greeter")
    async with connect(settings) as mesh:
        assert mesh.sidecar.identity.serial != cert.serial_number
        assert await mesh.call("hello") == "hi"
