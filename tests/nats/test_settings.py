"""``AGENTMESH_NATS_*`` settings for an operator-run NATS: user/password, a .creds file, TLS CA."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import pytest

from agentmesh.errors import RegistryUnavailable
from agentmesh.nats_server import NatsServer
from agentmesh.registry import LocalIndex, NatsConnection, RegistryStore
from agentmesh.security.identity import SpiffeId
from agentmesh.security.nats_auth import NatsAuthority
from agentmesh.security.nats_client import nats_credentials
from agentmesh.security.natsjwt import USER, NKey, format_creds
from agentmesh.settings import Settings
from tests.nats.support import Connection


@pytest.fixture
def password_nats(tmp_path: Path):
    """A nats-server whose only user is ``mesh`` / ``s3cret`` (the operator's own users)."""
    config = tmp_path / "users.conf"
    config.write_text('authorization { users = [ { user: mesh, password: "s3cret" } ] }\n')
    server = NatsServer(tmp_path / "nats", extra_config=config)
    server.start()
    yield server
    server.stop()


async def test_user_and_password(password_nats: NatsServer, tmp_path: Path):
    settings = Settings(data_dir=tmp_path, nats_user="mesh", nats_password="s3cret")
    conn = NatsConnection(password_nats.url, name="t", credentials=nats_credentials(settings, None))
    await conn.connect()
    try:
        assert not conn.unauthenticated
        store = RegistryStore(conn, f"t_{uuid4().hex[:12]}")
        await store.open()  # JetStream works for that user
    finally:
        await conn.close()
    wrong = Settings(data_dir=tmp_path, nats_user="mesh", nats_password="guess")
    conn = NatsConnection(password_nats.url, name="t", credentials=nats_credentials(wrong, None))
    with pytest.raises(RegistryUnavailable, match="Authorization Violation"):
        await conn.connect()


async def test_a_creds_file_and_a_tls_ca_file(tmp_path: Path):
    """A .creds file (here: one the mesh's account signed for a client) and the CA of the
    server's certificate: reading works, with the inbox the JWT's identity allows; writing a
    policy does not."""
    from agentmesh.control.ca import CertificateAuthority
    from agentmesh.nats_config import server_hosts, write_server_config, write_server_tls
    from agentmesh.security.pki import pem

    data = tmp_path / "data"
    authority = NatsAuthority.open(data)
    ca = CertificateAuthority.in_directory(data / "ca", "agentmesh.local", 3600.0)
    store_dir = tmp_path / "nats"
    store_dir.mkdir()
    write_server_tls(store_dir, ca, server_hosts("127.0.0.1"))
    server = NatsServer(store_dir, extra_config=write_server_config(store_dir, authority), tls=True)
    server.start()
    bucket = f"t_{uuid4().hex[:12]}"
    try:
        admin_jwt, admin_key = authority.own_user(
            SpiffeId("agentmesh.local", "control"), bucket=bucket
        )
        admin = NatsConnection(
            server.url,
            name="admin",
            credentials=lambda: {
                "tls": __import__("ssl").create_default_context(cadata=pem(ca.roots[0])),
                "user_jwt_cb": lambda: admin_jwt.encode(),
                "signature_cb": lambda n: __import__("base64").b64encode(
                    admin_key.sign(n.encode())
                ),
            },
        )
        await admin.connect()
        await RegistryStore(admin, bucket).open()
        await admin.close()

        user = NKey.generate(USER)
        jwt = authority.user_jwt(
            SpiffeId.client("agentmesh.local", "ops"), user.public, bucket=bucket, expires=None
        )
        creds = tmp_path / "ops.creds"
        creds.write_text(format_creds(jwt, user))
        ca_file = tmp_path / "ca.pem"
        ca_file.write_text(pem(ca.roots[0]))
        settings = Settings(data_dir=tmp_path, nats_creds_file=creds, nats_tls_ca_file=ca_file)
        conn = NatsConnection(server.url, name="ops", credentials=nats_credentials(settings, None))
        await conn.connect()
        try:
            store = RegistryStore(conn, bucket)
            await store.open()
            index = LocalIndex()
            index.start(store, conn)
            await index.wait_synced(10)  # a watch: consumer and replies under _INBOX.client.ops
            await index.stop()
        finally:
            await conn.close()
        raw = Connection()
        options = nats_credentials(settings, None)()
        await raw.connect(server.url, **options)
        try:
            await raw.violation(f"$KV.{bucket}_policies.AccessPolicy.x")
        finally:
            await raw.close()
    finally:
        server.stop()
