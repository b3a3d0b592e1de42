"""NATS as a set of servers: seed lists, the cluster's advertised URLs, following a moved NATS.

A mesh that outgrows one machine runs on a NATS cluster. Clients are given seeds
(``AGENTMESH_NATS_URL=nats://a:4222,nats://b:4222``) and learn the other nodes from the servers'
INFO (``connect_urls``), so losing a node costs a reconnect, not an outage. The control plane hands
out every client URL it knows in the bootstrap document.

An agent that bootstrapped from the control plane also follows NATS when it moves: when NATS has
been unreachable for a while (``AGENTMESH_NATS_REBOOTSTRAP_AFTER``), it asks the control plane
again and gives nats-py the new server list (its public ``set_server_pool``), so the reconnect loop
that is already running reaches the new address; subscriptions and watches resume as after any
reconnect. An agent never needs a restart because NATS came back elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agentmesh.errors import ConfigurationError, MeshError

if TYPE_CHECKING:
    from agentmesh.registry.connection import NatsConnection

__all__ = ["Rebootstrap", "ServerFollower", "advertised_servers", "split_urls"]

_log = logging.getLogger("agentmesh.registry")

Rebootstrap = Callable[[], Awaitable[list[str]]]
"""Where the NATS servers are now (normally: ask the control plane for its bootstrap)."""


def split_urls(urls: str | list[str]) -> list[str]:
    """``"nats://a:4222, nats://b:4222"`` → ``["nats://a:4222", "nats://b:4222"]`` (deduplicated).

    A bare ``host:port`` gets the ``nats://`` scheme, as nats-py would give it.
    """
    parts = urls.split(",") if isinstance(urls, str) else urls
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        url = part if "://" in part else f"nats://{part}"
        if url not in out:
            out.append(url)
    if not out:
        raise ConfigurationError(f"no NATS server URL in {urls!r}")
    return out


def advertised_servers(client: Any) -> list[str]:
    """Every client URL a connected nats-py client knows: its seeds plus the servers the cluster
    advertised (INFO ``connect_urls``), which is what a joining agent should be handed."""
    urls: list[str] = []
    for uri in client.servers:
        scheme = uri.scheme or "nats"
        url = f"{scheme}://{uri.hostname}:{uri.port or 4222}"
        if ":" in (uri.hostname or ""):
            url = f"{scheme}://[{uri.hostname}]:{uri.port or 4222}"
        if url not in urls:
            urls.append(url)
    return urls


class ServerFollower:
    """While NATS is lost, re-asks for the server list every ``after`` seconds and follows it."""

    def __init__(self, conn: NatsConnection, source: Rebootstrap, after: float) -> None:
        self._conn = conn
        self._source = source
        self._after = after
        self._task: asyncio.Task[None] | None = None

    def lost(self) -> None:
        """NATS went away: start watching the clock (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._follow(), name=f"rebootstrap:{self._conn.name}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self) -> None:
        while not self._conn.connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._conn.connected.wait(), self._after)
                return
            try:
                servers = split_urls(await self._source())
            except MeshError as exc:
                _log.warning(
                    "NATS at %s away for %gs; control plane not reachable either (%s)",
                    self._conn.url,
                    self._after,
                    exc,
                )
                continue
            self._use(servers)

    def _use(self, servers: list[str]) -> None:
        if servers == self._conn.servers:
            return
        try:
            self._conn.client.set_server_pool(servers)
        except Exception as exc:  # closed meanwhile: nothing left to follow
            _log.debug("server list not applied: %s", exc)
            return
        _log.warning(
            "NATS moved: following the control plane from %s to %s",
            self._conn.url,
            ",".join(servers),
        )
        self._conn.servers = servers
        self._conn.url = ",".join(servers)
