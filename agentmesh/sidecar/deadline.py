"""Deadline: one total budget per call, spent across every attempt and every layer below.

The remaining budget travels to the agent in a header, so the receiving side can stop work
that nobody waits for any more.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

from agentmesh.errors import DeadlineExceeded
from agentmesh.sidecar.call import Handler, OutboundCall, Reply

__all__ = ["DEADLINE_HEADER", "DeadlineLayer", "current_deadline"]

#: Milliseconds left in the caller's budget when the request left the sidecar.
DEADLINE_HEADER = "agentmesh-timeout-ms"


class DeadlineLayer:
    def __init__(self, inner: Handler) -> None:
        self._inner = inner

    async def __call__(self, call: OutboundCall) -> Reply:
        try:
            async with asyncio.timeout_at(call.deadline):
                return await self._inner(call)
        except TimeoutError as exc:
            where = f" at {call.target.url}" if call.target is not None else ""
            raise DeadlineExceeded(
                f"capability {call.capability!r}{where}: no reply within {call.timeout:g}s"
            ) from exc


#: The deadline of the inbound call being served, so that calls made from inside a capability
#: inherit what is left of their caller's budget: a chain can never outlive its caller.
current_deadline: ContextVar[float | None] = ContextVar("agentmesh_deadline", default=None)
