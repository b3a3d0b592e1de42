"""One NATS connection per process, with the reconnect behaviour the mesh relies on.

The data plane must survive NATS going away, so the client reconnects forever and tells its
users (the lease and the watch-fed index) when it is back, so that they can re-register and
resynchronise instead of trusting whatever a consumer replays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS

from agentmesh.errors import RegistryUnavailable

__all__ = ["NatsConnection"]

_log = logging.getLogger("agentmesh.registry")

Listener = Callable[[], Awaitable[None]]


class NatsConnection:
    """A reconnecting NATS client plus reconnect listeners."""

    def __init__(self, url: str, *, name: str) -> None:
        self.url = url
        self.name = name
        self._nc: NATS | None = None
        self._on_reconnect: list[Listener] = []
        self.connected = asyncio.Event()
        self._closing = False

    @property
    def client(self) -> NATS:
        if self._nc is None:
            raise RegistryUnavailable(f"NATS at {self.url}: not connected")
        return self._nc

    def on_reconnect(self, listener: Listener) -> None:
        """Call ``listener`` each time the connection comes back after a loss."""
        self._on_reconnect.append(listener)

    async def connect(self, timeout: float = 5.0) -> None:
        async def disconnected() -> None:
            self.connected.clear()
            if not self._closing:
                _log.warning("lost NATS at %s; reconnecting", self.url)

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

        try:
            self._nc = await nats.connect(
                self.url,
                name=self.name,
                connect_timeout=timeout,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                ping_interval=5,
                max_outstanding_pings=2,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
        except Exception as exc:
            raise RegistryUnavailable(f"NATS at {self.url}: cannot connect ({exc})") from exc
        self.connected.set()

    async def close(self) -> None:
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), timeout=2.0)
            except Exception:
                await self._nc.close()
        self._nc = None
