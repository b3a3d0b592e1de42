"""Route: the outbound layer that applies a capability's cached TrafficPolicy (no I/O).

``RouteLayer`` attaches the capability's TrafficPolicy to the call as ``call.traffic`` — the
layers below read their overrides from it (deadline: the timeout; retry: attempts, backoff,
per-try timeout; balance: the strategy; breaker: its thresholds) — and restricts
``call.targets`` to the version subset the weighted split picked. It runs after the access layer
(``access.py``): a canary coin flip never turns into a denial.
"""

from __future__ import annotations

from agentmesh.policy.cache import PolicyCache
from agentmesh.sidecar.call import Handler, OutboundCall, Reply

__all__ = ["RouteLayer"]


class RouteLayer:
    def __init__(self, inner: Handler, policies: PolicyCache) -> None:
        self._inner = inner
        self._policies = policies

    async def __call__(self, call: OutboundCall) -> Reply:
        rule = self._policies.snapshot.traffic.get(call.capability)
        if rule is not None:
            call.traffic, call.targets = rule.select(call.targets, call.affinity_key)
        return await self._inner(call)
