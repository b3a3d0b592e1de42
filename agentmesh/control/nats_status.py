"""What the control plane says about NATS: the embedded server's state and the cluster's URLs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from agentmesh.models import Bootstrap
from agentmesh.policy.store import policy_bucket
from agentmesh.registry.cluster import advertised_servers, raise_replicas
from agentmesh.registry.connection import NatsConnection
from agentmesh.security.store import security_bucket

__all__ = [
    "NatsView",
    "keep_replicas",
    "mesh_buckets",
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
