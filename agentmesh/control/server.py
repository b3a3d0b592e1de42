"""Running the control plane: an embedded NATS unless one is configured, then the API.

The embedded nats-server is started from the main thread before the event loop (its
parent-death signal is tied to the thread that spawns it), supervised while the API runs (the
loop runs in the main thread too, so restarts keep that tie) and stopped after the API is down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from agentmesh.control.app import create_app
from agentmesh.control.ca import CertificateAuthority
from agentmesh.control.feed import TelemetryFeed
from agentmesh.control.health import HealthBook
from agentmesh.control.https import PLAINTEXT_REFUSAL, ControlTLS, control_hosts
from agentmesh.control.issuer import Issuer
from agentmesh.control.nats_revocations import NatsRevocations
from agentmesh.control.nats_status import keep_replicas, mesh_buckets
from agentmesh.control.nats_supervisor import EmbeddedNats
from agentmesh.control.policyset import PolicySigner
from agentmesh.control.security import AdminAuth, ControlSecurity
from agentmesh.control.stats import StatsBook
from agentmesh.errors import MeshError
from agentmesh.inbound.server import HttpServer, bind, signals
from agentmesh.inbound.tls import InboundLimits
from agentmesh.nats_config import (
    keep_server_tls,
    secure_embedded,
    warn_if_open,
    write_server_config,
)
from agentmesh.security.files import ADMIN_TOKEN_FILE, ensure_admin_token, ensure_private_dir
from agentmesh.security.nats_auth import NatsAuthority
from agentmesh.security.store import SecurityStore, ca_bucket, security_bucket
from agentmesh.settings import Settings
from agentmesh.sidecar.bootstrap import local_bootstrap
from agentmesh.sidecar.sidecar import Sidecar

__all__ = ["ControlInfo", "run_control"]

_log = logging.getLogger("agentmesh.control")


class ControlInfo:
    """Where the running control plane can be reached."""

    def __init__(self, control_url: str, nats_url: str, embedded_nats: Path | None) -> None:
        self.control_url = control_url
        self.nats_url = nats_url
        self.embedded_nats = embedded_nats
        #: Where the admin token and the local join token are, the trust domain, the mTLS mode.
        self.security: dict[str, str] = {}

    def to_json(self) -> str:
        return json.dumps(
            {
                "control_url": self.control_url,
                "nats_url": self.nats_url,
                "embedded_nats": str(self.embedded_nats) if self.embedded_nats else None,
                **self.security,
            }
        )


def run_control(
    settings: Settings,
    *,
    host: str,
    port: int,
    on_ready: Callable[[ControlInfo], None] | None = None,
    insecure_http: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT. Blocking; call from the main thread.

    HTTPS unless ``insecure_http`` (development only: tokens would travel in clear)."""
    ensure_private_dir(settings.data_dir)
    sock = bind(host, port)
    nats: EmbeddedNats | None = None
    try:
        ca = CertificateAuthority.open(settings)
        nats_url = settings.nats_url
        if not nats_url:
            nats = EmbeddedNats(settings, **secure_embedded(settings, ca))
            nats.start()
            nats_url = nats.url
        display_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        scheme = "http" if insecure_http else "https"
        info = ControlInfo(
            f"{scheme}://{display_host}:{sock.getsockname()[1]}",
            nats_url,
            nats.store if nats else None,
        )
        tls = _https(settings, host, insecure_http, ca)
        asyncio.run(_serve(settings, sock, info, on_ready, ca, nats, tls))
    finally:
        sock.close()
        if nats is not None:
            nats.stop()


async def _serve(
    settings: Settings,
    sock: socket.socket,
    info: ControlInfo,
    on_ready: Callable[[ControlInfo], None] | None,
    ca: CertificateAuthority,
    nats: EmbeddedNats | None,
    tls: ControlTLS,
) -> None:
    boot = local_bootstrap(settings, nats_url=info.nats_url, control_url=info.control_url)
    # Named as an instance of "control": its own stats and breaker events pass the feed's check.
    sidecar = Sidecar(
        boot,
        settings,
        name=f"control-{socket.gethostname()}",
        caller="control",
        follow_control=False,
    )
    supervising = asyncio.create_task(nats.supervise()) if nats else None
    issuer = Issuer(ca, SecurityStore(sidecar.conn, security_bucket(boot.registry_bucket)))
    issuer.use_nats(NatsAuthority.open(settings.data_dir), boot.registry_bucket)
    sidecar.identity.use_issuer(issuer)
    await sidecar.start()
    await warn_if_open(sidecar.conn)
    signer = PolicySigner(sidecar.policies.store, ca, kept_in=settings.data_dir / "state")
    issuer.keep_in(settings.data_dir / "state")
    security, retiring = await _security(settings, issuer, signer, info)
    info.security["nats_auth"] = "open" if sidecar.conn.unauthenticated else "required"
    nats_revocations = await _nats_revocations(settings, sidecar, issuer, nats)
    background = [retiring]
    if nats is not None and nats.server.extra_config is not None:
        renewing = keep_server_tls(nats.server, ca, settings)
        background.append(asyncio.create_task(renewing, name="nats-tls"))
    if tls.mode != "off":
        info.security["roots_file"] = str(tls.roots_file)
    # The members' buckets, and the control plane's own (which only it may read).
    buckets = [*mesh_buckets(boot.registry_bucket), ca_bucket(boot.registry_bucket)]
    replicas = keep_replicas(sidecar.conn, buckets)
    await replicas()
    sidecar.conn.on_reconnect(replicas)
    health, stats = HealthBook(), StatsBook()
    await TelemetryFeed(health, stats).subscribe(sidecar.conn, boot.registry_bucket)
    app = create_app(sidecar, boot, health, stats, security, signer, settings)
    app.state.nats_server = nats.status if nats else None
    server = HttpServer(
        app,
        sock,
        tls=tls,
        owner="control plane",
        limits=InboundLimits.of(settings),
        plaintext_refusal=PLAINTEXT_REFUSAL,
    )
    stop = asyncio.Event()
    try:
        await server.start()
        if on_ready is not None:
            on_ready(info)
        with signals(stop.set):
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({stopped, server.task}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
    finally:
        await server.stop()
        for task in background:
            task.cancel()
        if supervising is not None:
            supervising.cancel()
        if nats_revocations is not None:
            await nats_revocations.close()
        await sidecar.close()


async def _nats_revocations(
    settings: Settings, sidecar: Sidecar, issuer: Issuer, nats: EmbeddedNats | None
) -> NatsRevocations | None:
    """Revocations reach NATS too, where it trusts the mesh's accounts (nats_revocations.py)."""
    authority = issuer.nats
    if authority is None or not NatsRevocations.usable(settings, sidecar.conn):
        return None
    pusher = NatsRevocations.connect_to(settings, sidecar.conn.url, authority, sidecar.identity)
    if nats is not None:
        store = nats.server.store_dir
        pusher.keep_in_config(lambda jwt: write_server_config(store, authority, jwt))
    try:
        await pusher.start(issuer.signed_revocations)
    except MeshError as exc:
        _log.warning(
            "revocations cannot reach NATS (%s): a revoked workload keeps NATS until its JWT "
            "expires; sidecars refuse it meanwhile",
            exc,
        )
        await pusher.close()
        return None
    issuer.on_revocations(pusher.push)
    return pusher


def _https(
    settings: Settings, host: str, insecure_http: bool, ca: CertificateAuthority
) -> ControlTLS:
    """The HTTPS certificate from the CA (before the loop: a bad certificate fails fast)."""
    if insecure_http:
        _log.warning(
            "the control plane serves plain HTTP (--insecure-http): admin and join tokens travel "
            "in clear; for development only"
        )
    hosts = control_hosts(host, settings.control_hosts)
    return ControlTLS(ca, hosts, settings.data_dir, insecure=insecure_http)


async def _security(
    settings: Settings, issuer: Issuer, signer: PolicySigner, info: ControlInfo
) -> tuple[ControlSecurity, asyncio.Task[None]]:
    """Publish the trust bundle, write the local join token and the admin token (0600); keep
    the signed state (revocation list, policy set) in NATS."""
    await issuer.store.open_private()
    await issuer.publish_bundle()
    await issuer.guard()
    await signer.adopt()
    await signer.guard()
    join_file = await issuer.local_token(settings.data_dir)
    token = ensure_admin_token(settings)
    info.security = {
        "trust_domain": issuer.trust_domain,
        "mtls": settings.mtls,
        "join_token_file": str(join_file),
        "admin_token_file": "AGENTMESH_TOKEN"
        if settings.token
        else str(settings.data_dir / ADMIN_TOKEN_FILE),
    }
    retiring = asyncio.create_task(
        _keep_state(issuer, signer, settings.state_guard_interval), name="ca-retire"
    )
    auth = AdminAuth(
        token,
        public_read=settings.public_read,
        session_ttl=settings.session_ttl,
        failures_per_minute=settings.auth_failures_per_minute,
    )
    return ControlSecurity(issuer, auth), retiring


async def _keep_state(issuer: Issuer, signer: PolicySigner, interval: float) -> None:
    """Retire old roots when due, and write back signed state NATS lost or was given forged."""
    retire = asyncio.create_task(issuer.retire_loop(), name="ca-retire-roots")
    try:
        while True:
            await asyncio.sleep(interval)
            try:
                await issuer.guard()
                await signer.guard()
            except MeshError as exc:
                _log.warning("could not check the signed state in NATS (%s); retrying", exc)
    finally:
        retire.cancel()
