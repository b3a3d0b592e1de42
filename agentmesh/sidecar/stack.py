"""The order of the outbound layers, written down in one place.

Read bottom-up in ``build_outbound``: each line wraps everything built before it, so the last
line is the outermost layer a call enters first (as Starlette builds its middleware stack and
linkerd2-proxy pushes its layers). DESIGN §3 is the target order; layers not built yet (trace,
policy, retry, breaker) slot in at the marked places without reshaping the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentmesh.registry.index import LocalIndex
from agentmesh.sidecar.balance import BalanceLayer
from agentmesh.sidecar.call import Handler
from agentmesh.sidecar.deadline import DeadlineLayer
from agentmesh.sidecar.resolve import ResolveLayer

__all__ = ["OutboundStack", "build_outbound"]


@dataclass(frozen=True, slots=True)
class OutboundStack:
    """The entry handler plus the layers whose state others read (metrics, CLI)."""

    handler: Handler
    balance: BalanceLayer


def build_outbound(index: LocalIndex, transport: Handler) -> OutboundStack:
    # transport: the only layer that knows the wire (HTTP now, NATS by URL scheme later).
    handler: Handler = transport
    # (breaker, per endpoint, goes here: below balance, so one bad replica is ejected alone.)
    # balance: per attempt, so that a retry above it may land on another endpoint.
    balance = BalanceLayer(handler, index)
    handler = balance
    # (retry goes here: above balance, below the deadline that bounds all attempts.)
    # deadline: one total budget for everything below, sent downstream as the remaining time.
    handler = DeadlineLayer(handler)
    # (policy goes here: a local decision on resolved targets, never retried.)
    # resolve: capability + constraints → live targets from the local index, no I/O.
    handler = ResolveLayer(handler, index)
    # (trace goes here, outermost: one CLIENT span per logical call.)
    return OutboundStack(handler=handler, balance=balance)
