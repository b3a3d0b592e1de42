"""The configuration the embedded nats-server runs with: TLS from the mesh CA, JWT accounts.

``agentmesh control`` writes, into the embedded server's store directory:

- ``server.key`` / ``server.pem``: a TLS server certificate from the mesh CA for the addresses
  it listens on (clients verify it against the mesh's trust bundle and check the host name);
  renewed at half its life like every mesh certificate, then the server reloads (SIGHUP);
- ``nats.conf``: the ``tls`` block and the mesh's operator and accounts
  (:meth:`agentmesh.security.nats_auth.NatsAuthority.resolver_config`), so that the server
  admits only connections with a user JWT the control plane signed, and enforces its
  permissions per subject.

Listening address, port and JetStream store stay command-line flags of :class:`NatsServer`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentmesh.nats_server import NatsServer
from agentmesh.security.files import write_private
from agentmesh.security.nats_auth import NatsAuthority
from agentmesh.settings import Settings

if TYPE_CHECKING:
    from agentmesh.control.ca import CertificateAuthority
    from agentmesh.registry.connection import NatsConnection

__all__ = [
    "CONFIG_NAME",
    "ROUTE_USER",
    "keep_server_tls",
    "secure_embedded",
    "server_hosts",
    "warn_if_open",
    "write_node_tls",
    "write_server_config",
    "write_server_tls",
]

_log = logging.getLogger("agentmesh.control")

CONFIG_NAME = "nats.conf"
#: Where the embedded server listens (NatsServer's default).
EMBEDDED_HOST = "127.0.0.1"
ROUTE_USER = "route.agentmesh.invalid"
"""The name a NATS cluster node's certificate carries for its routes (``cluster.authorization``
in examples/deploy's node files); ``.invalid`` is reserved (RFC 2606): never a real host."""
#: A client may take this long for its TLS handshake (the server's default, 2 s, is short for a
#: loaded machine running a whole mesh).
_TLS_TIMEOUT = 5


def secure_embedded(settings: Settings, ca: CertificateAuthority) -> dict[str, Any]:
    """What the control plane's own nats-server runs with: TLS and the mesh's accounts (the
    :class:`NatsServer` arguments), written into its store; nothing if mTLS is off.

    ``AGENTMESH_MTLS=off`` opts out of identities, and with them of NATS credentials: the
    server is then open, and the control plane says so loudly (:func:`warn_if_open`).
    """
    store = settings.data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    authority = NatsAuthority.open(settings.data_dir)
    secure = settings.mtls != "off"
    _move_streams(store, authority, secure=secure)
    if not secure:
        return {}
    write_server_tls(store, ca, server_hosts(EMBEDDED_HOST, settings.advertise_host))
    return {"extra_config": write_server_config(store, authority), "tls": True}


def _move_streams(store: Path, authority: NatsAuthority, *, secure: bool) -> None:
    """Keep the mesh's buckets (policies!) across a switch between an open and a secured server.

    JetStream keeps an account's streams in ``jetstream/<account>``: the open server's account
    is ``$G``, the secured one's the mesh account's public key. A store made before NATS
    authentication (or with mTLS off) is moved over once, and back if mTLS is turned off.
    """
    accounts = store / "jetstream"
    source, target = accounts / "$G", accounts / authority.account.public
    if not secure:
        source, target = target, source
    if source.is_dir() and not target.exists():
        source.rename(target)
        _log.warning("embedded NATS: moved the mesh's JetStream data from %s to %s", source, target)


async def keep_server_tls(server: NatsServer, ca: CertificateAuthority, settings: Settings) -> None:
    """Renew the embedded server's certificate at half its life, and have it reload."""
    from agentmesh.security.pki import load_certs

    while True:
        cert = load_certs((server.store_dir / "server.pem").read_bytes())[0]
        await asyncio.sleep(max((cert.not_valid_after_utc.timestamp() - time.time()) / 2, 1.0))
        hosts = server_hosts(server.host, settings.advertise_host)
        write_server_tls(server.store_dir, ca, hosts)
        server.reload()
        _log.info("embedded NATS: TLS certificate renewed")


async def warn_if_open(conn: NatsConnection) -> None:
    """Log, loudly, if NATS takes connections without credentials (its INFO says so)."""
    await conn.probe()
    if conn.unauthenticated:
        _log.warning(
            "NATS at %s is OPEN: it accepts connections without credentials, so anyone who can "
            "reach it can rewrite policies, revocations and registry records. Run it with the "
            "mesh's accounts (agentmesh nats-config; docs/security.md)",
            conn.url,
        )


def server_hosts(host: str, advertised: str | None = None) -> list[str]:
    """The names a client may dial the server by: its address (on a wildcard address, this
    machine's names), the advertised host if any, and the loopback names."""
    names = (
        [host] if host not in ("0.0.0.0", "::", "") else [socket.gethostname(), socket.getfqdn()]
    )
    if advertised:
        names.append(advertised)
    names += ["127.0.0.1", "localhost", "::1"]
    return list(dict.fromkeys(n for n in names if n))


def write_server_tls(
    directory: Path,
    ca: CertificateAuthority,
    hosts: list[str],
    *,
    name: str = "server",
    route: bool = False,
    ttl: float | None = None,
) -> float:
    """A fresh key and certificate (``name``.key/.pem) into ``directory``; its expiry.

    ``route``: a cluster node's, usable on its routes too (see :func:`write_node_tls`).
    """
    from agentmesh.security.pki import key_pem, new_key, pem

    key = new_key()
    cert = ca.issue_server(key, hosts, route=route, ttl=ttl)
    chain = [ca.signer] if ca.signer not in ca.roots else []
    write_private(directory / f"{name}.key", key_pem(key))
    write_private(directory / f"{name}.pem", "".join(pem(c) for c in [cert, *chain]).encode())
    return cert.not_valid_after_utc.timestamp()


def write_node_tls(
    directory: Path, ca: CertificateAuthority, hosts: list[str], ttl: float
) -> list[Path]:
    """TLS for the nodes of an operator-run NATS cluster (``agentmesh nats-config --tls-dir``).

    ``nats.pem``/``nats.key``: one certificate for the addresses clients and peers dial
    (``hosts``) plus :data:`ROUTE_USER`, which clients check like the embedded server's and the
    nodes present to each other on their routes; ``mesh-ca.pem``: the mesh's roots, what a
    route's peer must chain to. A route is admitted only with a certificate naming
    :data:`ROUTE_USER` (``verify_and_map``): a workload's certificate chains to the same roots but
    carries only its SPIFFE ID, so it can never join the cluster.
    """
    from agentmesh.security.pki import pem

    directory.mkdir(parents=True, exist_ok=True)
    write_server_tls(directory, ca, [*hosts, ROUTE_USER], name="nats", route=True, ttl=ttl)
    (directory / "mesh-ca.pem").write_text("".join(pem(c) for c in ca.roots))
    return [directory / n for n in ("nats.pem", "nats.key", "mesh-ca.pem")]


def write_server_config(
    directory: Path, authority: NatsAuthority, account_jwt: str | None = None
) -> Path:
    """``nats.conf`` naming the TLS files and the mesh's accounts; its path. ``account_jwt``:
    the mesh account's with the revocations in force, so that a reload or restart keeps them
    (``agentmesh.control.nats_revocations``)."""
    path = directory / CONFIG_NAME
    text = (
        "# Written by agentmesh control at every start; do not edit.\n"
        "tls {\n"
        f'  cert_file: "{directory / "server.pem"}"\n'
        f'  key_file: "{directory / "server.key"}"\n'
        f"  timeout: {_TLS_TIMEOUT}\n"
        "}\n" + authority.resolver_config(account_jwt)
    )
    write_private(path, text.encode())
    return path
