"""What the control plane says about NATS: the embedded server's state, the cluster's URLs, and
the cluster's JetStream meta leader (asked as the system account, whose keys it holds)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI

from agentmesh.errors import MeshError
from agentmesh.models import Bootstrap, JetStreamMeta, MetaPeer
from agentmesh.policy.store import policy_bucket
from agentmesh.registry.cluster import advertised_servers, raise_replicas
from agentmesh.registry.connection import NatsConnection
from agentmesh.security.nats_auth import NatsAuthority
from agentmesh.security.store import security_bucket

__all__ = [
    "NatsView",
    "jetstream_meta",
    "keep_replicas",
    "mesh_buckets",
    "meta_from_jsz",
    "nats_router",
    "nats_server_status",
    "nats_view",
    "with_cluster_urls",
]

_log = logging.getLogger("agentmesh.control")


def nats_server_status(app: FastAPI, conn: NatsConnection) -> dict[str, object]:
    """The embedded server's supervisor state, or where the external NATS is."""
    status: Callable[[], dict[str, object]] | None = getattr(app.state, "nats_server", None)
    if status is not None:
        return status()
    return {"mode": "external", "url": conn.url}


def with_cluster_urls(boot: Bootstrap, conn: NatsConnection) -> Bootstrap:
    """``boot`` with every client URL the connected servers advertise (seeds first)."""
    try:
        urls = advertised_servers(conn.client)
    except Exception:  # not connected: the configured seeds are all there is to say
        return boot
    return boot.model_copy(update={"nats_url": ",".join(urls)}) if urls else boot


@dataclass(frozen=True)
class NatsView:
    """The dashboard's NATS card: a short state and whether it is bad."""

    state: str
    detail: str
    bad: bool


def nats_view(conn: NatsConnection, state: Any) -> NatsView:
    """What the overview shows about NATS (``state`` is the API app's ``app.state``)."""
    status: Callable[[], dict[str, object]] | None = getattr(state, "nats_server", None)
    connected = conn.connected.is_set()
    if status is None:
        return NatsView(
            "connected" if connected else "lost", f"external, {conn.url}", not connected
        )
    server = status()
    restarts = server.get("restarts") or 0
    detail = f"embedded, {server.get('url')}"
    if restarts:
        detail += f", restarted {restarts}× (last: {server.get('last_exit')})"
    return NatsView(str(server.get("state")), detail, server.get("state") != "running")


def mesh_buckets(registry_bucket: str) -> list[str]:
    """The KV buckets of the mesh whose registry is ``registry_bucket``."""
    return [registry_bucket, policy_bucket(registry_bucket), security_bucket(registry_bucket)]


def keep_replicas(conn: NatsConnection, buckets: list[str]) -> Callable[[], Awaitable[None]]:
    """What the control plane runs at start and after each reconnect: raise every bucket to the
    replica count it should have (``AGENTMESH_KV_REPLICAS`` or min(3, servers))."""

    async def check() -> None:
        try:
            await raise_replicas(conn.client, buckets, conn.replicas())
        except Exception as exc:  # NATS away again: the next reconnect retries
            _log.warning("bucket replicas not checked: %s", exc)

    return check


_JSZ = "$SYS.REQ.SERVER.PING.JSZ"
_SYS_TIMEOUT = 2.0
"""Seconds for the system connection and the servers' first answer: a diagnostic, asked by
``agentmesh check`` (whose own probes wait 3 s); not worth an operator's setting."""


def meta_from_jsz(jsz: dict[str, Any], server: str) -> JetStreamMeta | None:
    """The meta group in a server's JSZ report (HTTP ``/jsz`` or ``$SYS``), ``server`` being
    its name; None when it has none (a single server) or no leader is elected."""
    meta = jsz.get("meta_cluster")
    if not isinstance(meta, dict) or not meta.get("leader"):
        return None
    peers = [
        MetaPeer(
            name=str(p.get("name")), current=bool(p.get("current")), offline=bool(p.get("offline"))
        )
        for p in meta.get("replicas") or []
    ]
    return JetStreamMeta(
        cluster=str(meta.get("name")), leader=str(meta["leader"]), server=server, peers=peers
    )


async def jetstream_meta(conn: NatsConnection, authority: NatsAuthority) -> JetStreamMeta | None:
    """The meta group as the first server to answer ``$SYS.REQ.SERVER.PING.JSZ`` reports it.

    Only the system account may ask; the control plane holds its key, so it connects briefly
    as a system user (same servers, same TLS as its own connection). None on an open NATS
    (no accounts), a single server, or no answer.
    """
    import nats.errors

    from agentmesh.security.nats_client import signed_by

    user_jwt, key = authority.system_user()
    base = conn.credentials

    def options() -> dict[str, Any]:
        tls = {k: v for k, v in (base() if base else {}).items() if k == "tls"}
        return {**tls, **signed_by(user_jwt, key)}

    system = NatsConnection(conn.servers, name="agentmesh-control-system", credentials=options)
    try:
        await system.connect(_SYS_TIMEOUT)
        reply = await system.client.request(_JSZ, b"{}", timeout=_SYS_TIMEOUT)
        answer = json.loads(reply.data)
        return meta_from_jsz(answer.get("data") or {}, str(answer["server"]["name"]))
    except (MeshError, nats.errors.Error, ValueError, KeyError, TypeError) as exc:
        _log.info("JetStream meta group not read through the system account: %s", exc)
        return None
    finally:
        await system.close()


def nats_router(conn: NatsConnection, authority: NatsAuthority) -> APIRouter:
    """``GET /v1/nats/meta``: what ``agentmesh check`` shows of the cluster's meta leader."""
    router = APIRouter(tags=["mesh"])

    @router.get("/v1/nats/meta")
    async def get_meta() -> JetStreamMeta | None:
        """The JetStream meta group (leader, servers), asked of NATS as the system account;
        null for a single server or when NATS does not answer."""
        return await jetstream_meta(conn, authority)

    return router
