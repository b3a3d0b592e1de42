"""Balance: choose one live endpoint for this attempt.

Power of two choices on in-flight requests (as Envoy's least-request and Linkerd do): pick two
endpoints at random and send to the less busy one. It needs no global view, spreads idle load
evenly, and steers away from a replica that is slow (its requests pile up). Draining
instances receive no new calls.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from agentmesh.errors import NoHealthyEndpoints
from agentmesh.registry.index import LocalIndex, Target
from agentmesh.sidecar.call import Handler, OutboundCall, Reply

__all__ = ["BalanceLayer", "EndpointState"]


@dataclass(slots=True)
class EndpointState:
    """What the balancer knows of one instance, kept while the instance is in the index."""

    in_flight: int = 0
    calls: int = 0


class BalanceLayer:
    def __init__(self, inner: Handler, index: LocalIndex, *, rng: random.Random | None = None):
        self._inner = inner
        self._index = index
        self._rng = rng or random.Random()
        self.endpoints: dict[str, EndpointState] = {}
        index.on_change(self._prune)

    def _prune(self) -> None:
        live = {r.instance_id for r in self._index.records()}
        for instance_id in [i for i in self.endpoints if i not in live]:
            del self.endpoints[instance_id]

    def state(self, instance_id: str) -> EndpointState:
        state = self.endpoints.get(instance_id)
        if state is None:
            state = self.endpoints[instance_id] = EndpointState()
        return state

    def choose(self, targets: tuple[Target, ...], capability: str) -> Target:
        serving = [t for t in targets if t.record.status == "serving"]
        if not serving:
            raise NoHealthyEndpoints(
                f"capability {capability!r}: all {len(targets)} instance(s) are draining"
            )
        if len(serving) == 1:
            return serving[0]
        a, b = self._rng.sample(serving, 2)
        return (
            a if self.state(a.instance_id).in_flight <= self.state(b.instance_id).in_flight else b
        )

    async def __call__(self, call: OutboundCall) -> Reply:
        target = call.target = self.choose(call.targets, call.capability)
        state = self.state(target.instance_id)
        state.in_flight += 1
        state.calls += 1
        try:
            reply = await self._inner(call)
        except BaseException:
            state.in_flight -= 1
            raise
        if reply.chunks is None:
            state.in_flight -= 1
        else:
            reply.chunks = _release_after(reply.chunks, state)
        return reply


async def _release_after(
    chunks: AsyncIterator[bytes], state: EndpointState
) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        state.in_flight -= 1
