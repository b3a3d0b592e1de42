"""One throwaway mesh CA per test process, so the whole suite runs with mTLS on (strict).

Every in-process sidecar (the ``settings`` fixture) and every agent process of the e2e suite
(``support.mesh_env``) is given the CA files (``AGENTMESH_CA_CERT_FILE``/``KEY_FILE``), so each
issues its own short-lived certificate from it, recorded in its mesh's security bucket like any
other, without a control plane. That costs an EC key and a signature per sidecar (~1 ms); the
CA itself is made once per process (per xdist worker). Tests that exercise enrolment through the
control plane start a real one, with its own CA, instead.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agentmesh.control.ca import CertificateAuthority, write_root_ca
from agentmesh.control.policyset import PolicySigner
from agentmesh.policy.store import PolicyStore
from agentmesh.registry import NatsConnection, RegistryStore
from agentmesh.security.identity import SpiffeId
from agentmesh.security.pki import client_context, new_key, server_context
from agentmesh.security.signed import seal_record

TRUST_DOMAIN = "agentmesh.local"


@dataclass(frozen=True, eq=False)
class MeshCA:
    cert_file: Path
    key_file: Path

    def env(self) -> dict[str, str]:
        return {
            "AGENTMESH_CA_CERT_FILE": str(self.cert_file),
            "AGENTMESH_CA_KEY_FILE": str(self.key_file),
        }

    @functools.cached_property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.from_files(
            self.cert_file, self.key_file, TRUST_DOMAIN, ttl=24 * 3600.0
        )

    def policy_signer(self, store: PolicyStore) -> PolicySigner:
        """Signs policy writes into the signed policy set, as the control plane does."""
        return PolicySigner(store, self.ca)

    def sealer(self, agent: str) -> Callable[[bytes], bytes]:
        """Signs registry records as agent ``agent`` would (a fresh certificate of it)."""
        key = new_key()
        cert = self.ca.issue(key.public_key(), SpiffeId.agent(TRUST_DOMAIN, agent))
        return lambda record: seal_record(record, key, [cert])

    async def store_as(self, conn: NatsConnection, bucket: str, agent: str) -> RegistryStore:
        """A registry store on ``conn`` whose records are signed as agent ``agent``."""
        store = RegistryStore(conn, bucket)
        await store.open()
        store.seal = self.sealer(agent)
        return store

    def server_tls(self, agent: str) -> StaticServerTLS:
        """TLS for a raw test server that the mesh should accept as agent ``agent``."""
        key = new_key()
        cert = self.ca.issue(key.public_key(), SpiffeId.agent(TRUST_DOMAIN, agent))
        return StaticServerTLS(server_context(key, [cert], self.ca.roots))

    def client_context(self, name: str = "tests") -> ssl.SSLContext:
        """TLS for raw HTTP clients (httpx ``verify=``): client ``name``, trusting the test CA."""
        key = new_key()
        cert = self.ca.issue(key.public_key(), SpiffeId.client(TRUST_DOMAIN, name))
        return client_context(key, [cert], self.ca.roots)


@dataclass(frozen=True)
class StaticServerTLS:
    """``agentmesh.inbound.tls.ServerTLS`` with one fixed certificate (no renewal)."""

    context: ssl.SSLContext
    mode: Literal["strict", "permissive", "off"] = "strict"
    trust_domain: str = TRUST_DOMAIN

    def server_context(self) -> ssl.SSLContext:
        return self.context


@functools.cache
def mesh_ca() -> MeshCA:
    directory = Path(tempfile.mkdtemp(prefix="agentmesh-test-ca-"))
    atexit.register(shutil.rmtree, directory, True)
    cert, key = write_root_ca(directory, TRUST_DOMAIN)
    return MeshCA(cert, key)
