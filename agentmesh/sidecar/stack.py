"""The order of the outbound layers, written down in one place.

Read ``build_outbound`` bottom-up: each line wraps everything built before it, so the last line
is the outermost layer, the one a call enters first (as Starlette builds its middleware stack and
linkerd2-proxy pushes its layers). docs/architecture.md lists the same order with what each
layer does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agentmesh.policy.cache import PolicyCache
from agentmesh.registry.index import LocalIndex
from agentmesh.settings import Settings
from agentmesh.sidecar.access import AccessLayer
from agentmesh.sidecar.balance import BalanceLayer
from agentmesh.sidecar.breaker import BreakerLayer, BreakerState
from agentmesh.sidecar.call import Handler
from agentmesh.sidecar.chain import ChainLayer
from agentmesh.sidecar.deadline import AttemptTimeoutLayer, DeadlineLayer
from agentmesh.sidecar.endpoints import Endpoints
from agentmesh.sidecar.instrument import AttemptLayer, ObserveLayer
from agentmesh.sidecar.resolve import ResolveLayer
from agentmesh.sidecar.retry import RetryLayer, default_policy
from agentmesh.sidecar.route import RouteLayer
from agentmesh.telemetry.stats import StatsCollector

__all__ = ["OutboundStack", "build_outbound"]


@dataclass(frozen=True, slots=True)
class OutboundStack:
    """The entry handler plus the layers whose state others read (metrics, CLI, tests)."""

    handler: Handler
    endpoints: Endpoints
    balance: BalanceLayer
    retry: RetryLayer


def build_outbound(
    index: LocalIndex,
    transport: Handler,
    settings: Settings,
    *,
    caller: str,
    on_breaker_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    stats: StatsCollector | None = None,
    policies: PolicyCache | None = None,
    own_spiffe: Callable[[], str | None] | None = None,
) -> OutboundStack:
    endpoints = Endpoints(index, on_breaker_change=on_breaker_change)
    # transport: the only layer that knows the wire (HTTP now, NATS by URL scheme later).
    handler: Handler = transport
    # attempt timeout: the call's deadline and the per-try bound, below the span and the breaker
    # so that both see a timeout as this endpoint's failure rather than a cancellation.
    handler = AttemptTimeoutLayer(handler)
    # attempt: each failed attempt (this endpoint's failure, timeouts included) as an event on
    # the call's span, so a retried call shows what every attempt met.
    handler = AttemptLayer(handler)
    # breaker: per endpoint, below balance, so one bad replica is ejected alone.
    handler = BreakerLayer(handler, endpoints)
    # balance: per attempt, so each retry may land on another endpoint.
    balance = BalanceLayer(handler, endpoints, strategy=settings.balance, zone=settings.zone)
    handler = balance
    # retry: above balance and below the deadline that bounds every attempt and backoff; it
    # picks each attempt's per-try timeout, which the attempt timeout enforces.
    retry = RetryLayer(handler, policy=default_policy(settings))
    handler = retry
    # deadline: the one place the call's total budget is fixed (after route: a TrafficPolicy's
    # timeout counts); everything below spends it, and the rest travels downstream.
    handler = DeadlineLayer(handler, default_timeout=settings.call_timeout)
    if policies is not None:
        # route: the capability's TrafficPolicy as call.traffic (timeout, retry, balance and
        # breaker overrides that the layers below read) and its weighted version split.
        handler = RouteLayer(handler, policies)
        # access: a local decision on the resolved targets (fail fast; the receiving sidecar
        # decides for good), never retried. Before the split: a coin flip never denies.
        handler = AccessLayer(handler, policies, caller=caller, own_spiffe=own_spiffe)
    # resolve: capability + constraints → live targets from the local index, no I/O.
    handler = ResolveLayer(handler, index)
    # chain: refuse a too-deep chain before any work, and tell the next hop the chain.
    handler = ChainLayer(handler, max_hops=settings.max_hops)
    # observe, outermost: one CLIENT span (its context travels as traceparent with every
    # attempt), metrics and an access-log line per logical call.
    handler = ObserveLayer(handler, caller=caller, stats=stats)
    return OutboundStack(handler=handler, endpoints=endpoints, balance=balance, retry=retry)
