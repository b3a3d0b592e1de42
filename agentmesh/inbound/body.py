"""Reading a request body within a limit, for the raw ASGI apps (an agent's inbound, the
standalone sidecar's egress).

A declared ``content-length`` above the limit is refused before a byte is read; a body that
grows past it is refused as soon as it does, so no caller makes a server buffer more than the
limit. The 413 names the setting to raise: the caller cannot guess it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from agentmesh.errors import PayloadTooLarge

__all__ = ["Disconnected", "read_body"]

Receive = Callable[[], Awaitable[dict[str, Any]]]


class Disconnected(Exception):
    """The caller went away before sending its whole request."""


def _too_large(who: str, size: str, limit: int, owner: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{who}: request body {size + ' ' if size else ''}is larger than its limit of "
        f"{limit} bytes (AGENTMESH_MAX_PAYLOAD_BYTES of {owner})"
    )


async def read_body(
    scope: dict[str, Any], receive: Receive, limit: int, *, who: str, owner: str
) -> bytes:
    """The whole body of the request, at most ``limit`` bytes; ``who`` refuses it (``agent
    summarizer``, ``egress``) and ``owner`` is the process whose setting that is."""
    for key, value in scope["headers"]:
        if key == b"content-length" and value.isdigit() and int(value) > limit:
            raise _too_large(who, f"of {int(value)} bytes", limit, owner)
    first = await receive()
    if first["type"] == "http.disconnect":
        raise Disconnected
    if not first.get("more_body"):  # the usual case: one message, no joining
        body: bytes = first.get("body", b"")
        if len(body) > limit:
            raise _too_large(who, "", limit, owner)
        return body
    chunks = [first.get("body", b"")]
    size = len(chunks[0])
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(who, "", limit, owner)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)
