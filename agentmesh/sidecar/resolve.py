"""Resolve: capability (+ version, tags, labels) → the live targets, from the local index.

No I/O: the index is fed by a watch in the background. The errors here are the ones a user
most often meets, so they say what exists instead.
"""

from __future__ import annotations

import difflib

from agentmesh.errors import CapabilityNotFound, NoHealthyEndpoints
from agentmesh.registry.index import LocalIndex, matches
from agentmesh.sidecar.call import Handler, OutboundCall, Reply

__all__ = ["ResolveLayer"]


class ResolveLayer:
    def __init__(self, inner: Handler, index: LocalIndex) -> None:
        self._inner = inner
        self._index = index

    async def __call__(self, call: OutboundCall) -> Reply:
        targets = self._index.targets(call.capability)
        if not targets:
            raise self._not_found(call.capability)
        if call.version is not None or call.tags or call.labels:
            targets = tuple(t for t in targets if matches(t, call.version, call.tags, call.labels))
            if not targets:
                raise NoHealthyEndpoints(
                    f"capability {call.capability!r}: no live instance matches "
                    f"{_describe_filters(call)}"
                )
        call.targets = targets
        return await self._inner(call)

    def _not_found(self, capability: str) -> CapabilityNotFound:
        known = self._index.capabilities()
        close = difflib.get_close_matches(capability, known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        if not known:
            hint = "; no agents are registered (is any agent running?)"
        return CapabilityNotFound(f"no live agent offers capability {capability!r}{hint}")


def _describe_filters(call: OutboundCall) -> str:
    parts = []
    if call.version is not None:
        parts.append(f"version {call.version}")
    if call.tags:
        parts.append(f"tags {sorted(call.tags)}")
    if call.labels:
        parts.append(f"labels {call.labels}")
    return ", ".join(parts)
