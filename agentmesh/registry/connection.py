"""One NATS connection per process, with the reconnect behaviour the mesh relies on.

The data plane must survive NATS going away, so the client reconnects forever and tells its
users (the lease and the watch-fed index) when it is back, so that they can re-register and
resynchronise instead of trusting whatever a consumer replays. ``url`` may name several servers
(comma-separated seeds of a cluster); nats-py then also learns the cluster's other nodes from the
servers' INFO. When NATS has been away for ``rebootstrap_after`` seconds and a ``rebootstrap``
source is given (the control plane), the server list is asked for again and followed
(``agentmesh.registry.cluster``), so an address change never needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from nats.aio.client import Client as NATS

from agentmesh.errors import RegistryUnavailable
from agentmesh.registry.cluster import (
    Rebootstrap,
    ServerFollower,
    default_replicas,
    split_urls,
    through_election,
)

__all__ = ["NatsConnection"]

_log = logging.getLogger("agentmesh.registry")

Listener = Callable[[], Awaitable[None]]
T = TypeVar("T")

_PER_SERVER_TIMEOUT = 2.0
"""Seconds one server gets to answer a new connection before the next seed is tried."""


class NatsConnection:
    """A reconnecting NATS client plus reconnect listeners."""

    def __init__(
        self,
        url: str | list[str],
        *,
        name: str,
        rebootstrap: Rebootstrap | None = None,
        rebootstrap_after: float = 5.0,
        kv_replicas: int | None = None,
        jetstream_wait: float = 20.0,
        ping_interval: float = 2.0,
    ) -> None:
        self.servers = split_urls(url)
        self.url = ",".join(self.servers)
        self.name = name
        self._nc: NATS | None = None
        self._on_reconnect: list[Listener] = []
        self.connected = asyncio.Event()
        self._closing = False
        self._kv_replicas = kv_replicas
        #: How long start-up steps wait for JetStream to answer (through a leader election).
        self.jetstream_wait = jetstream_wait
        self.ping_interval = ping_interval
        self._follower = (
            ServerFollower(self, rebootstrap, rebootstrap_after) if rebootstrap else None
        )

    @property
    def client(self) -> NATS:
        if self._nc is None:
            raise RegistryUnavailable(f"NATS at {self.url}: not connected")
        return self._nc

    def replicas(self) -> int:
        """Replicas of the buckets this process creates: the setting, else min(3, the number
        of servers the cluster advertises) (``agentmesh.registry.cluster``)."""
        return self._kv_replicas or default_replicas(self.client)

    async def through_election(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """``op()`` retried while JetStream does not answer, up to ``jetstream_wait`` seconds."""
        return await through_election(op, wait=self.jetstream_wait, what=what)

    def on_reconnect(self, listener: Listener) -> None:
        """Call ``listener`` each time the connection comes back after a loss."""
        self._on_reconnect.append(listener)

    async def connect(self, timeout: float = 5.0) -> None:
        async def disconnected() -> None:
            was_connected = self.connected.is_set()
            self.connected.clear()
            if was_connected and not self._closing:
                _log.warning("lost NATS at %s; reconnecting", self.url)
                if self._follower is not None:
                    self._follower.lost()

        async def reconnected() -> None:
            self.connected.set()
            _log.info("reconnected to NATS at %s", self.url)
            for listener in list(self._on_reconnect):
                try:
                    await listener()
                except Exception:
                    _log.exception("reconnect listener failed")

        async def error(exc: Exception) -> None:
            _log.debug("NATS %s: %s", self.url, exc)

        # nats-py annotates some of these as int, but takes seconds as floats.
        options: dict[str, Any] = {
            "name": self.name,
            # Per server: a stalled node (it accepts TCP, never answers) must not use up the
            # whole budget before the next seed is tried.
            "connect_timeout": min(timeout, _PER_SERVER_TIMEOUT),
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            # Two unanswered pings mark the server stale: a hung node (a stalled VM) is left
            # for another within about three intervals.
            "ping_interval": self.ping_interval,
            "max_outstanding_pings": 2,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
        }
        nc = NATS()
        try:
            await _reachable(self.servers, timeout)
            # nats-py retries even the first connection forever when reconnects are unlimited:
            # bound it, so a wrong URL is an error, not a hang.
            budget = timeout + _PER_SERVER_TIMEOUT * (len(self.servers) - 1)
            await asyncio.wait_for(nc.connect(servers=self.servers, **options), budget)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            if isinstance(exc, ConnectionRefusedError):
                reason = "connection refused"
            elif isinstance(exc, TimeoutError):
                reason = f"no answer within {timeout:g}s"
            else:
                reason = str(exc) or type(exc).__name__
            raise RegistryUnavailable(
                f"NATS at {self.url}: cannot connect ({reason}); is nats-server running?"
            ) from exc
        self._nc = nc
        self.connected.set()

    async def close(self) -> None:
        self._closing = True
        if self._follower is not None:
            await self._follower.stop()
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), timeout=2.0)
            except Exception:
                with contextlib.suppress(Exception):
                    await self._nc.close()
        self._nc = None


async def _reachable(servers: list[str], timeout: float) -> None:
    """Fail fast when no seed accepts a connection: nats-py would retry until the timeout.

    One answering seed is enough (a cluster with a node down is still reachable).
    """
    error: BaseException = OSError("no server to try")
    for url in servers:
        parsed = urlsplit(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            error = exc
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise error
