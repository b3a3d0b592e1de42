"""The standalone sidecar's lifecycle: an :class:`~agentmesh.Agent` serving the app's capabilities.

Order: bind the egress port (so the app can be told its URL) → start the app if we own it →
wait (bounded) for the app to answer → serve the mesh port, register, heartbeat (the agent
runtime, unchanged) → serve the egress on the agent's own sidecar → on SIGTERM drain, deregister,
stop the egress, then stop the app we started. The app's health is the agent's readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlsplit

from agentmesh.agent import Agent
from agentmesh.errors import ConfigurationError
from agentmesh.inbound.server import HttpServer, bind
from agentmesh.proxy import SIDECAR_LABEL
from agentmesh.proxy.app_health import AppHealth
from agentmesh.proxy.egress import EgressApp
from agentmesh.proxy.forward import AppCapability, AppClient
from agentmesh.proxy.manifest import AgentManifest
from agentmesh.proxy.process import (
    APP_PORT_ENV,
    EGRESS_URL_ENV,
    FORWARDED_SIGNALS,
    AppProcess,
)
from agentmesh.settings import Settings
from agentmesh.sidecar.http1 import Limits

__all__ = ["SidecarProxy"]

_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_log = logging.getLogger("agentmesh.sidecar")


class SidecarProxy:
    """One app behind one sidecar: ``await proxy.serve()`` until SIGTERM."""

    def __init__(
        self,
        manifest: AgentManifest,
        *,
        settings: Settings,
        app_url: str | None = None,
        command: Sequence[str] = (),
        app_health: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        egress_port: int | None = None,
    ) -> None:
        self.manifest = manifest
        self.settings = settings
        app_host, app_port = _app_address(app_url, bool(command))
        self.app = AppClient(app_host, app_port, Limits.from_settings(settings))
        self.health = AppHealth(self.app, app_health, timeout=settings.app_probe_timeout)
        self.command = list(command)
        self.host = host
        self.port = port
        self.egress_port = settings.egress_port if egress_port is None else egress_port
        self.egress_url: str | None = None
        self.process: AppProcess | None = None
        spec = manifest.spec
        self.agent = Agent(
            manifest.metadata.name,
            version=spec.version,
            description=manifest.metadata.description,
            labels={**spec.labels, SIDECAR_LABEL: "true"},
            capabilities=[AppCapability(c, self.app) for c in spec.capabilities],
            readiness=self.health,
        )

    async def serve(
        self, *, on_ready: Callable[[SidecarProxy], None] | None = None, handle_signals: bool = True
    ) -> None:
        try:
            egress_sock = bind("127.0.0.1", self.egress_port)
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"sidecar {self.agent.name}: the egress port: {exc.message.split('; ')[0]}; "
                "choose another --egress-port (0: any free port)"
            ) from exc
        egress_sock.listen(128)  # calls the app makes before the egress serves wait in the backlog
        self.egress_url = f"http://127.0.0.1:{egress_sock.getsockname()[1]}"
        egress: HttpServer | None = None
        try:
            if self.command:
                self.process = AppProcess(
                    self.command,
                    {APP_PORT_ENV: str(self.app.port), EGRESS_URL_ENV: self.egress_url},
                    backoff=self.settings.app_restart_backoff,
                    backoff_max=self.settings.app_restart_backoff_max,
                    grace=max(self.settings.drain_grace, 1.0),
                )
                await self.process.start()
            if not await self.health.wait_healthy(self.settings.app_start_timeout):
                _log.warning(
                    "the app at %s did not answer within %gs; registering as unready",
                    self.app.url,
                    self.settings.app_start_timeout,
                )
            started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def ready(agent: Agent) -> None:
                started.set_result(None)

            serving = asyncio.create_task(
                self.agent.serve(
                    host=self.host,
                    port=self.port,
                    settings=self.settings,
                    on_ready=ready,
                    handle_signals=handle_signals,
                )
            )
            await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                await serving  # failed before it was ready: raise its error
                return
            assert self.agent.mesh is not None
            egress = HttpServer(
                EgressApp(self.agent.mesh.sidecar, self.settings),
                egress_sock,
                graceful=1.0,
                owner=f"{self.agent.name} egress",
            )
            await egress.start()
            if on_ready is not None:
                on_ready(self)
            with _forwarding(self.process, enabled=handle_signals):
                await serving
        finally:
            if egress is not None:
                await egress.stop()
            else:
                egress_sock.close()
            if self.process is not None:
                code = await self.process.stop()
                _log.info("the app exited with code %s", code)
            self.app.close()

    def stop(self) -> None:
        """Drain and stop, as SIGTERM does."""
        self.agent.stop()


@contextlib.contextmanager
def _forwarding(process: AppProcess | None, *, enabled: bool) -> Iterator[None]:
    """Pass SIGHUP/SIGUSR1/SIGUSR2 on to the app we started while the sidecar serves."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if process is not None and enabled:
        for sig in FORWARDED_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, process.send_signal, sig)
                installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _app_address(app_url: str | None, owns_app: bool) -> tuple[str, int]:
    """Where the app listens. The app is reached in plaintext, so it must be on loopback: the
    identity header is trustworthy only because nothing but the sidecar can reach the app."""
    if app_url is None:
        if not owns_app:
            raise ConfigurationError("sidecar: give --app URL, or the app's command after '--'")
        return "127.0.0.1", _free_port()
    url = urlsplit(app_url)
    if url.scheme != "http" or not url.hostname or url.port is None:
        raise ConfigurationError(
            f"sidecar: --app {app_url!r} must be http://127.0.0.1:PORT (plain HTTP on loopback)"
        )
    if url.hostname not in _LOOPBACK:
        raise ConfigurationError(
            f"sidecar: --app {app_url!r} is not on loopback; the app must listen on 127.0.0.1 "
            "so that only its sidecar can reach it (docs/sidecar.md)"
        )
    return url.hostname, url.port


def _free_port() -> int:
    """A port for the app to listen on (AGENTMESH_APP_PORT); the kernel's pick, released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
