"""The NATS the registry benchmarks (S5-S7) run on: as ``agentmesh control`` embeds it.

TLS with a certificate from a mesh CA, and JWT accounts: every connection presents a user JWT
with the permissions of its identity (watchers are clients, writers and agents are agents), as
in a default setup. ``BENCH_NATS=plain`` runs an open, plaintext NATS instead, to measure what
TLS and authentication cost.
"""

from __future__ import annotations

import os
from pathlib import Path

from agentmesh.control.ca import CertificateAuthority
from agentmesh.nats_config import server_hosts, write_server_config, write_server_tls
from agentmesh.nats_server import NatsServer
from agentmesh.registry.connection import Credentials
from agentmesh.security.files import write_private
from agentmesh.security.identity import SpiffeId
from agentmesh.security.nats_auth import NatsAuthority
from agentmesh.security.nats_client import nats_credentials
from agentmesh.security.natsjwt import format_creds
from agentmesh.security.pki import pem
from agentmesh.settings import Settings

__all__ = ["BenchNats", "agent", "client"]

TD = "agentmesh.local"


def agent(name: str) -> SpiffeId:
    return SpiffeId.agent(TD, name)


def client(name: str = "bench") -> SpiffeId:
    return SpiffeId.client(TD, name)


class BenchNats:
    """A nats-server in ``workdir``, and credentials for identities on it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.secure = os.environ.get("BENCH_NATS", "secure") != "plain"
        store = workdir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        self._authority: NatsAuthority | None = None
        if not self.secure:
            self.server = NatsServer(store)
            return
        ca = CertificateAuthority.in_directory(workdir / "ca", TD, 3600.0)
        self._authority = NatsAuthority.open(workdir)
        write_server_tls(store, ca, server_hosts("127.0.0.1"))
        config = write_server_config(store, self._authority)
        self.server = NatsServer(store, config=config, tls=True)
        self.ca_file = workdir / "nats-ca.pem"
        self.ca_file.write_text("".join(pem(r) for r in ca.roots))

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def env(self, identity: SpiffeId, bucket: str) -> dict[str, str]:
        """``AGENTMESH_NATS_*`` settings that connect as ``identity`` (a .creds file)."""
        if self._authority is None:
            return {}
        jwt, key = self._authority.own_user(identity, bucket=bucket)
        path = self.workdir / "creds" / f"{identity.kind}-{identity.name}.creds"
        write_private(path, format_creds(jwt, key).encode())
        return {
            "AGENTMESH_NATS_CREDS_FILE": str(path),
            "AGENTMESH_NATS_TLS_CA_FILE": str(self.ca_file),
        }

    def settings(self, identity: SpiffeId, bucket: str, **more: object) -> Settings:
        names = {
            k.removeprefix("AGENTMESH_").lower(): v for k, v in self.env(identity, bucket).items()
        }
        return Settings(nats_url=self.url, registry_bucket=bucket, **names, **more)  # type: ignore[arg-type]

    def credentials(self, identity: SpiffeId, bucket: str) -> Credentials | None:
        """Connect options for a bare ``NatsConnection`` as ``identity``."""
        if not self.secure:
            return None
        return nats_credentials(self.settings(identity, bucket), None)
