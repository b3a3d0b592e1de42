"""Running the control plane: an embedded NATS unless one is configured, then the API.

The embedded nats-server is started from the main thread before the event loop (its
parent-death signal is tied to the thread that spawns it) and stopped after the API is down.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path

from nats.aio.msg import Msg

from agentmesh._serving import HttpServer, bind, signals
from agentmesh.control.app import create_app
from agentmesh.control.health import HealthBook
from agentmesh.nats_server import NatsServer
from agentmesh.settings import Settings
from agentmesh.sidecar.bootstrap import local_bootstrap
from agentmesh.sidecar.sidecar import Sidecar, breaker_subject

__all__ = ["ControlInfo", "run_control"]


class ControlInfo:
    """Where the running control plane can be reached."""

    def __init__(self, control_url: str, nats_url: str, embedded_nats: Path | None) -> None:
        self.control_url = control_url
        self.nats_url = nats_url
        self.embedded_nats = embedded_nats

    def to_json(self) -> str:
        return json.dumps(
            {
                "control_url": self.control_url,
                "nats_url": self.nats_url,
                "embedded_nats": str(self.embedded_nats) if self.embedded_nats else None,
            }
        )


def run_control(
    settings: Settings,
    *,
    host: str,
    port: int,
    on_ready: Callable[[ControlInfo], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. Blocking; call from the main thread."""
    sock = bind(host, port)
    nats: NatsServer | None = None
    try:
        nats_url = settings.nats_url
        if not nats_url:
            store = settings.data_dir / "nats"
            store.mkdir(parents=True, exist_ok=True)
            nats = NatsServer(store)
            nats.start()
            nats_url = nats.url
        display_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        info = ControlInfo(
            f"http://{display_host}:{sock.getsockname()[1]}",
            nats_url,
            settings.data_dir / "nats" if nats else None,
        )
        asyncio.run(_serve(settings, sock, info, on_ready))
    finally:
        sock.close()
        if nats is not None:
            nats.stop()


async def _serve(
    settings: Settings,
    sock: socket.socket,
    info: ControlInfo,
    on_ready: Callable[[ControlInfo], None] | None,
) -> None:
    boot = local_bootstrap(settings, nats_url=info.nats_url, control_url=info.control_url)
    sidecar = Sidecar(boot, settings, name="agentmesh-control", caller="control")
    await sidecar.start()
    health = HealthBook()

    async def on_breaker_event(msg: Msg) -> None:
        health.apply(msg.data)

    await sidecar.conn.client.subscribe(breaker_subject(boot.registry_bucket), cb=on_breaker_event)
    server = HttpServer(create_app(sidecar, boot, health), sock)
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
        await sidecar.close()
