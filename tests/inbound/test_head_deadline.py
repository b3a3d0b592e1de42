"""The request-head deadline of a kept-alive connection follows each request.

One timer per connection serves every request on it (``agentmesh.inbound.tls``): a head started
after that timer was armed still gets its whole ``header_timeout``; one that never ends is
answered with 408 and closed, and the server forgets the connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agentmesh.inbound.server import HttpServer, bind
from agentmesh.inbound.tls import InboundLimits
from tests.mesh_ca import StaticServerTLS, mesh_ca

_TIMEOUT = 1.0
_REQUEST = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def _response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 10)


async def test_a_head_gets_its_whole_timeout_on_a_kept_alive_connection_then_408() -> None:
    context = mesh_ca().server_tls("agent").server_context()
    server = HttpServer(
        _ok,
        bind("127.0.0.1", 0),
        graceful=1.0,
        tls=StaticServerTLS(context, mode="permissive"),  # plaintext: the bytes are the test's
        limits=InboundLimits(
            max_header_bytes=16384,
            max_header_count=100,
            header_timeout=_TIMEOUT,
            handshake_timeout=_TIMEOUT,
        ),
    )
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        loop = asyncio.get_running_loop()
        # The timer armed when the connection opened is due half-way through the stalled head
        # below: it must then follow that head's own deadline, not close the connection.
        writer.write(_REQUEST)
        assert (await _response(reader)).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(_TIMEOUT / 2)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # a head that never ends
        stalled = loop.time()
        answer = await asyncio.wait_for(reader.read(), 10)
        waited = loop.time() - stalled
        writer.close()
        # The refused connection is forgotten, not kept by uvicorn until shutdown.
        connections = server._server.server_state.connections
        for _ in range(500):
            if not connections:
                break
            await asyncio.sleep(0.01)
        assert not connections
    finally:
        await server.stop()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert waited >= _TIMEOUT * 0.9, f"closed {waited:.3f}s into a head allowed {_TIMEOUT}s"
