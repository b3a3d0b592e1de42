"""The httpx face: ``httpx.AsyncClient(transport=mesh.transport())`` calls capabilities.

Code written against httpx (and libraries that accept an ``httpx.AsyncClient``) reaches the
mesh without learning another API: a request to ``http://summarize.mesh/`` or to
``/v1/invoke/summarize`` (any host) becomes one call through the sidecar's outbound stack, the
same call ``Mesh.call`` makes. Nothing goes through httpcore: the transport hands the request to
the stack directly, which owns the wire.

The answer is an HTTP response as an agent would give it: 200 with the JSON value, or the
error's problem+json document with its status (``response.raise_for_status()`` works; the
``code`` field says which mesh error it was). ``accept: text/event-stream`` (or a streaming
capability) answers with the agents' server-sent events, read with ``client.stream(...)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from agentmesh.errors import MeshError, RouteNotFound
from agentmesh.proxy.calls import INVOKE_PREFIX, problem_body, send_call
from agentmesh.proxy.calls import sse_events as _sse_events
from agentmesh.settings import Settings
from agentmesh.sidecar.call import Reply
from agentmesh.sidecar.sidecar import Sidecar

__all__ = ["MESH_HOST_SUFFIX", "MeshTransport"]

#: ``http://<capability>.mesh/`` names a capability by host.
MESH_HOST_SUFFIX = ".mesh"
_JSON = {"content-type": "application/json"}
_PROBLEM = {"content-type": "application/problem+json"}
_EVENTS = {"content-type": "text/event-stream", "cache-control": "no-cache"}


class MeshTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose every request is a mesh call through ``sidecar``."""

    def __init__(self, sidecar: Sidecar, settings: Settings) -> None:
        self._sidecar = sidecar
        self._settings = settings
        self._handler = sidecar.outbound.handler

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            capability = _capability_of(request)
        except MeshError as exc:
            return _problem(exc, request)
        body = await request.aread()
        headers = {k: v for k, v in request.headers.items() if k not in ("host", "content-length")}
        try:
            call, reply = await send_call(self._handler, capability, body, headers)
        except MeshError as exc:
            return _problem(exc, request)
        if reply.chunks is None and not call.stream:
            return httpx.Response(200, headers=_JSON, content=reply.body, request=request)
        return httpx.Response(200, headers=_EVENTS, stream=_Events(reply), request=request)


class _Events(httpx.AsyncByteStream):
    """A reply's chunks as server-sent events, produced as they arrive."""

    def __init__(self, reply: Reply) -> None:
        self._events = _sse_events(reply)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for event in self._events:
            yield event

    async def aclose(self) -> None:
        await self._events.aclose()


def _capability_of(request: httpx.Request) -> str:
    host = request.url.host
    path = request.url.path
    if host.endswith(MESH_HOST_SUFFIX) and path in ("", "/"):
        name = host[: -len(MESH_HOST_SUFFIX)]
    elif path.startswith(INVOKE_PREFIX):
        name = path[len(INVOKE_PREFIX) :]
    else:
        raise RouteNotFound(
            f"{request.method} {request.url}: call a capability as POST "
            f"http://<capability>{MESH_HOST_SUFFIX}/ or POST {INVOKE_PREFIX}<capability>"
        )
    if request.method != "POST":
        raise RouteNotFound(f"{request.method} {request.url}: capabilities are called with POST")
    return name


def _problem(error: MeshError, request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        error.status, headers=_PROBLEM, content=problem_body(error), request=request
    )
