"""Deliberately failing and hung endpoints registered in the mesh, for breaker and health tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from agentmesh import AgentRecord, Mesh, capability
from agentmesh.inbound.server import HttpServer, bind
from agentmesh.registry import Lease
from tests.mesh_ca import mesh_ca


@capability(idempotent=True)
async def work(delay: float = 0.0) -> str:
    await asyncio.sleep(delay)
    return "ok"


class Flaky:
    """A raw HTTP endpoint that answers 503 while ``failing``, else a valid JSON reply."""

    def __init__(self) -> None:
        self.failing = True
        self.hits = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.hits += 1
        status, body = (503, b"overloaded") if self.failing else (200, b'"ok"')
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def _registered(app: Any, name: str, mesh: Mesh) -> AsyncIterator[str]:
    """Serve ``app`` over mTLS, registered in the mesh as instance ``<name>-1`` of ``work``."""
    server = HttpServer(app, bind("127.0.0.1", 0), tls=mesh_ca().server_tls(name))
    await server.start()
    record = AgentRecord(
        instance_id=f"{name}-1",
        name=name,
        identity=f"spiffe://agentmesh.local/agent/{name}",
        mtls="strict",
        endpoint=f"https://127.0.0.1:{server.port}",
        capabilities=(work.spec,),
    )
    store = await mesh_ca().store_as(mesh.sidecar.conn, mesh.sidecar.store.bucket, name)
    lease = Lease(store, record, interval=0.25, ttl=1)
    await lease.acquire()
    try:
        yield record.instance_id
    finally:
        await lease.release()
        await server.stop()


@contextlib.asynccontextmanager
async def flaky_endpoint(mesh: Mesh) -> AsyncIterator[tuple[Flaky, str]]:
    """A Flaky server registered in the mesh as an instance offering ``work``."""
    app = Flaky()
    async with _registered(app, "flaky", mesh) as instance_id:
        yield app, instance_id


class Frozen:
    """A raw HTTP endpoint that reads each request and never answers it (a hung replica),
    until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'"late"'})


@contextlib.asynccontextmanager
async def frozen_endpoint(mesh: Mesh) -> AsyncIterator[str]:
    """A Frozen server registered in the mesh as an instance offering ``work``; its id."""
    app = Frozen()
    async with _registered(app, "frozen", mesh) as instance_id:
        try:
            yield instance_id
        finally:
            app.release.set()  # before the server stops: it waits for its handlers
