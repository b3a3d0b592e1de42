"""The three baselines a mesh call is judged against.

* **B0** — the floor for HTTP: one ``aiohttp.ClientSession`` (keep-alive) against a raw
  ASGI echo app on uvicorn, no framework. A mesh over HTTP cannot beat this; the gap to
  it is the mesh's own cost plus the framework's.
* **B1** — what a user writes without a mesh: a plain ``httpx.AsyncClient`` (default
  transport) against a FastAPI endpoint that takes and returns a pydantic model. A mesh
  that is slower than this costs its users something they can see.
* **B2** — the floor for NATS: nats-py request/reply through an embedded nats-server to
  a nats-py responder, for the planned NATS transport.

Every server runs in its own process on 127.0.0.1 with an ephemeral port (see
``bench/_servers.py``); the clients live in the benchmarking process.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from .processes import find_nats_server, wait_until_ready
from .targets import ProcessTarget
from .workloads import make_payload

__all__ = ["AiohttpRawAsgi", "HttpxFastAPI", "NatsRequestReply"]

SERVERS = Path(__file__).with_name("_servers.py")
"""Executed by path in the child, so the child imports nothing from ``bench``."""
_PORT_LINE = re.compile(r"PORT (\d+) loop=(\S+) http=(\S+)")
_READY_LINE = re.compile(r"READY subject=(\S+) loop=(\S+)")
_NATS_LISTENING = re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)")
_JSON_HEADERS = {"content-type": "application/json"}
_PROBE = make_payload(256)
_START_TIMEOUT_S = 30.0
"""Generous: two cold Python interpreters importing FastAPI on two busy cores take a while."""
_NATS_SUBJECT = "bench.echo"


class CallFailed(RuntimeError):
    """A call got an answer, but not a successful one (non-2xx)."""


class AiohttpRawAsgi(ProcessTarget):
    """B0: aiohttp client → raw ASGI echo on uvicorn."""

    description = "aiohttp.ClientSession (one, keep-alive) → raw ASGI echo app on uvicorn"

    def __init__(self) -> None:
        super().__init__()
        self._session: aiohttp.ClientSession | None = None
        self._url = ""

    async def start(self) -> None:
        """Spawn uvicorn, learn its port from the ready line, poll until it echoes."""
        proc = self.spawn("uvicorn-asgi", [sys.executable, str(SERVERS), "asgi"])
        m = await proc.read_line(_PORT_LINE, _START_TIMEOUT_S)
        self.facts.update(server=f"uvicorn {m[2]}/{m[3]}", client=f"aiohttp {aiohttp.__version__}")
        self._url = f"http://127.0.0.1:{m[1]}/echo"
        self._session = aiohttp.ClientSession()
        await wait_until_ready(
            lambda: self.call(_PROBE), "B0 uvicorn", _START_TIMEOUT_S, self.processes
        )

    async def call(self, payload: bytes) -> bytes:
        """POST the payload; the body of a 200 is the answer."""
        session = self._session
        assert session is not None, "B0 is not started"
        async with session.post(self._url, data=payload, headers=_JSON_HEADERS) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise CallFailed(f"B0: HTTP {resp.status}: {body[:200]!r}")
            return body

    async def close_client(self) -> None:
        """Close the session (and its keep-alive connections)."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpxFastAPI(ProcessTarget):
    """B1: plain httpx client → FastAPI endpoint with a pydantic model."""

    description = "httpx.AsyncClient (one, default transport) → FastAPI + pydantic model on uvicorn"

    def __init__(self) -> None:
        super().__init__()
        self._client: httpx.AsyncClient | None = None
        self._url = ""

    async def start(self) -> None:
        """Spawn uvicorn with the FastAPI app, poll until it echoes."""
        proc = self.spawn("uvicorn-fastapi", [sys.executable, str(SERVERS), "fastapi"])
        m = await proc.read_line(_PORT_LINE, _START_TIMEOUT_S)
        self.facts.update(server=f"uvicorn {m[2]}/{m[3]}", client=f"httpx {httpx.__version__}")
        self._url = f"http://127.0.0.1:{m[1]}/echo"
        self._client = httpx.AsyncClient()
        await wait_until_ready(
            lambda: self.call(_PROBE), "B1 FastAPI", _START_TIMEOUT_S, self.processes
        )

    async def call(self, payload: bytes) -> bytes:
        """POST the payload as a user would with httpx; non-200 raises."""
        client = self._client
        assert client is not None, "B1 is not started"
        resp = await client.post(self._url, content=payload, headers=_JSON_HEADERS)
        if resp.status_code != 200:
            raise CallFailed(f"B1: HTTP {resp.status_code}: {resp.content[:200]!r}")
        return resp.content

    async def close_client(self) -> None:
        """Close the client's connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class NatsRequestReply(ProcessTarget):
    """B2: nats-py request/reply through an embedded nats-server to a nats-py responder."""

    description = "nats-py request/reply → nats-server → nats-py responder (echo)"

    def __init__(self) -> None:
        super().__init__()
        self._nc: Any = None

    async def start(self) -> None:
        """Start nats-server on a free port (read from its log), then the responder."""
        import nats

        binary = find_nats_server()
        log = self.workdir / "nats-server.log"
        server = self.spawn(
            "nats-server", [str(binary), "-a", "127.0.0.1", "-p", "-1", "-l", str(log)]
        )
        m = await server.read_log_line(log, _NATS_LISTENING, _START_TIMEOUT_S)
        url = f"nats://127.0.0.1:{m[1]}"
        responder = self.spawn(
            "nats-responder", [sys.executable, str(SERVERS), "nats-responder", url, _NATS_SUBJECT]
        )
        r = await responder.read_line(_READY_LINE, _START_TIMEOUT_S)
        self._nc = await nats.connect(url, name="bench-client", allow_reconnect=False)
        self.facts.update(responder_loop=r[2], url=url)
        await wait_until_ready(
            lambda: self.call(_PROBE), "B2 nats responder", _START_TIMEOUT_S, self.processes
        )

    async def call(self, payload: bytes) -> bytes:
        """One request; the reply's data is the answer."""
        nc = self._nc
        assert nc is not None, "B2 is not started"
        msg = await nc.request(_NATS_SUBJECT, payload, timeout=10.0)
        data: bytes = msg.data
        return data

    async def close_client(self) -> None:
        """Close the NATS connection."""
        if self._nc is not None:
            await self._nc.close()
            self._nc = None
