"""Is the app up? The standalone sidecar's readiness follows the answer.

The agent runtime polls readiness (every half heartbeat) and publishes each change in the
registry record: an app that stops answering takes the instance out of rotation within a
heartbeat, and one that comes back puts it back, with no sidecar restart. A probe is a ``GET``
of the app's health path (any 2xx is healthy) or, without one, a TCP connect to its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agentmesh.errors import MeshError
from agentmesh.proxy.forward import AppClient
from agentmesh.sidecar.http1 import Disconnected

__all__ = ["AppHealth"]

_log = logging.getLogger("agentmesh.sidecar")


class AppHealth:
    """A readiness callable for :class:`agentmesh.Agent`: ``await health()`` → bool."""

    def __init__(self, app: AppClient, path: str | None, *, timeout: float) -> None:
        self._app = app
        self._path = path
        self._timeout = timeout
        self._request = app.head("GET", path) + b"\r\n" if path else b""
        self.healthy: bool | None = None
        """The last answer (None before the first probe)."""

    async def __call__(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                ok, why = await self._probe()
        except TimeoutError:
            ok, why = False, f"no answer within {self._timeout:g}s"
        if ok != self.healthy:
            if ok:
                level = logging.INFO if self.healthy is None else logging.WARNING
                _log.log(level, "the app at %s is up", self._app.url)
            elif self.healthy is not None:
                _log.warning("the app at %s is down (%s): out of rotation", self._app.url, why)
        self.healthy = ok
        return ok

    async def _probe(self) -> tuple[bool, str]:
        if not self._path:
            try:
                _, writer = await asyncio.open_connection(self._app.host, self._app.port)
            except OSError as exc:
                return False, exc.strerror or str(exc)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True, ""
        try:
            resp = await self._app.request(self._request)
            await resp.read()
        except (MeshError, Disconnected) as exc:
            return False, str(exc)
        if 200 <= resp.status < 300:
            return True, ""
        return False, f"GET {self._path}: HTTP {resp.status}"

    async def wait_healthy(self, timeout: float, interval: float = 0.1) -> bool:
        """Probe until healthy or ``timeout`` passed (a freshly started app)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self():
            if loop.time() + interval > deadline:
                return False
            await asyncio.sleep(interval)
        return True
