"""Loop guard: every call carries the chain of capabilities that led to it.

Agents calling agents can loop (A asks B, which asks A, …) or fan out without end. The chain
travels in a header; each hop appends its capability, and a call deeper than the limit is refused
at the caller with an error that shows the chain, before any network work.
"""

from __future__ import annotations

from contextvars import ContextVar

from agentmesh.errors import LoopDetected
from agentmesh.sidecar.call import Handler, OutboundCall, Reply

__all__ = ["CHAIN_HEADER", "DEFAULT_MAX_HOPS", "ChainLayer", "current_chain", "parse_chain"]

CHAIN_HEADER = "agentmesh-chain"
DEFAULT_MAX_HOPS = 16

#: The chain of the inbound call being served (set by the inbound app), empty at the origin.
current_chain: ContextVar[tuple[str, ...]] = ContextVar("agentmesh_chain", default=())


def parse_chain(value: str) -> tuple[str, ...]:
    return tuple(part for part in value.split(",") if part)


class ChainLayer:
    def __init__(self, inner: Handler, *, max_hops: int = DEFAULT_MAX_HOPS) -> None:
        self._inner = inner
        self.max_hops = max_hops

    async def __call__(self, call: OutboundCall) -> Reply:
        chain = (*current_chain.get(), call.capability)
        if len(chain) > self.max_hops:
            shown = " → ".join(chain if len(chain) <= 8 else (*chain[:3], "…", *chain[-4:]))
            raise LoopDetected(
                f"call chain of {len(chain)} hops exceeds the limit of {self.max_hops}: {shown}"
            )
        if len(chain) > 1:
            call.headers[CHAIN_HEADER] = ",".join(chain)
        return await self._inner(call)
