"""Egress: the app's door out, ``POST {egress}/v1/invoke/{capability}`` on 127.0.0.1.

Every call goes through the sidecar's full outbound stack (resolve, policy, routes, deadline,
retries, balancing, breakers, mTLS, telemetry) with the sidecar's identity, which is the
app's. Errors come back as the problem+json documents in-process callers' errors are made of;
a streaming capability answers with the agents' own server-sent events. The port listens on
loopback only: whoever reaches it speaks as the app.
"""

from __future__ import annotations

from typing import Any

from agentmesh.errors import MeshError, RouteNotFound
from agentmesh.inbound.body import Disconnected, read_body
from agentmesh.proxy.calls import (
    INVOKE_PREFIX,
    problem_body,
    send_call,
    sse_events,
    wanted_headers,
)
from agentmesh.settings import Settings
from agentmesh.sidecar.call import Reply
from agentmesh.sidecar.sidecar import Sidecar

__all__ = ["EgressApp"]

Scope = dict[str, Any]

_JSON = b"application/json"
_PROBLEM = b"application/problem+json"


class EgressApp:
    """ASGI app of the egress port (plain HTTP; the caller is the app on loopback)."""

    def __init__(self, sidecar: Sidecar, settings: Settings) -> None:
        self._sidecar = sidecar
        self._settings = settings
        self._handler = sidecar.outbound.handler
        self._max_body = settings.max_payload_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if scope["method"] == "POST" and path.startswith(INVOKE_PREFIX):
            await self._invoke(path[len(INVOKE_PREFIX) :], scope, receive, send)
        elif scope["method"] in ("GET", "HEAD") and path == "/healthz":
            await _respond(send, 200, b'{"status":"ok"}')
        else:
            error = RouteNotFound(
                f"{scope['method']} {path}: the egress serves POST {INVOKE_PREFIX}{{capability}}"
            )
            await _respond(send, error.status, problem_body(error), _PROBLEM)

    async def _invoke(self, capability: str, scope: Scope, receive: Any, send: Any) -> None:
        headers = wanted_headers(scope["headers"])
        try:
            body = await read_body(
                scope, receive, self._max_body, who="egress", owner="the sidecar"
            )
            call, reply = await send_call(self._handler, capability, body, headers)
        except Disconnected:
            return
        except MeshError as exc:
            await _respond(send, exc.status, problem_body(exc), _PROBLEM)
            return
        if reply.chunks is None and not call.stream:
            await _respond(send, 200, reply.body)
        else:  # asked for a stream, or a streaming capability called as plain JSON
            await _respond_stream(send, reply)


async def _respond_stream(send: Any, reply: Reply) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
        }
    )
    events = sse_events(reply)
    try:
        async for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await events.aclose()


async def _respond(send: Any, status: int, body: bytes, content_type: bytes = _JSON) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})
