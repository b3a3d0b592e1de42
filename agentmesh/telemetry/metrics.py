"""Prometheus metric definitions shared by the agent runtime and the sidecar.

Defined once at import, in the process-wide registry, so ``/metrics`` on any agent shows the
same families whatever code path created them.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BREAKER_STATE",
    "BREAKER_TRANSITIONS",
    "INBOUND_IN_FLIGHT",
    "INBOUND_LATENCY",
    "INBOUND_REQUESTS",
    "LEASE_RENEWALS",
    "NATS_DROPPED",
    "OUTBOUND_IN_FLIGHT",
    "OUTBOUND_LATENCY",
    "OUTBOUND_REQUESTS",
    "OUTBOUND_RETRIES",
    "REGISTRY_INSTANCES",
    "REGISTRY_OVER_CAP",
    "RETRY_BUDGET_EXHAUSTED",
    "UNKNOWN_CAPABILITY",
    "labelled",
]

#: The capability label of calls to a name nobody serves: names come from callers and apps (an
#: LLM's tool call, a typo), and each label value is a child kept for the process's life.
UNKNOWN_CAPABILITY = "_unknown"

INBOUND_REQUESTS = Counter(
    "agentmesh_inbound_requests",
    "Calls received by this agent, by caller, capability and HTTP status.",
    ["agent", "caller", "capability", "status"],
)
INBOUND_LATENCY = Histogram(
    "agentmesh_inbound_latency_seconds",
    "Time to serve a call, from the request to the last byte of the response.",
    ["agent", "capability"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INBOUND_IN_FLIGHT = Gauge(
    "agentmesh_inbound_in_flight",
    "Calls being served by this agent right now.",
    ["agent"],
)
OUTBOUND_REQUESTS = Counter(
    "agentmesh_outbound_requests",
    "Logical calls made by this sidecar, by caller, capability, callee agent and outcome "
    "(ok, or the error code).",
    ["caller", "capability", "callee", "status"],
)
OUTBOUND_LATENCY = Histogram(
    "agentmesh_outbound_latency_seconds",
    "Time of a logical call as the caller sees it, retries included.",
    ["capability", "callee"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
OUTBOUND_IN_FLIGHT = Gauge(
    "agentmesh_outbound_in_flight",
    "Calls this sidecar is waiting on right now.",
    ["caller"],
)
REGISTRY_INSTANCES = Gauge(
    "agentmesh_registry_instances",
    "Live agent instances in this sidecar's registry index.",
)
REGISTRY_OVER_CAP = Counter(
    "agentmesh_registry_over_cap",
    "Registry records ignored because their agent has AGENTMESH_REGISTRY_MAX_INSTANCES_PER_AGENT "
    "instances in the index already (no agent label: the names come from the registry).",
)
NATS_DROPPED = Counter(
    "agentmesh_nats_dropped",
    "NATS messages dropped because the subscription's pending buffer was full (a slow "
    "consumer), by subscription subject.",
    ["subscription"],
)
LEASE_RENEWALS = Counter(
    "agentmesh_lease_renewals",
    "Registry lease renewals of this agent's record.",
    ["instance"],
)
OUTBOUND_RETRIES = Counter(
    "agentmesh_outbound_retries",
    "Retries sent by this sidecar, by capability.",
    ["capability"],
)
RETRY_BUDGET_EXHAUSTED = Counter(
    "agentmesh_retry_budget_exhausted",
    "Retries not sent because the capability's retry budget was spent.",
    ["capability"],
)
BREAKER_STATE = Gauge(
    "agentmesh_breaker_state",
    "Circuit breaker of each endpoint this sidecar calls: 0 closed, 1 half-open, 2 open.",
    ["instance"],
)
BREAKER_TRANSITIONS = Counter(
    "agentmesh_breaker_transitions",
    "Circuit breaker state changes, by endpoint and the state entered.",
    ["instance", "state"],
)

_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, cached: on the call path, ``labels()`` costs a few µs
    (validation and a lock) while the cached child is one dict lookup."""
    key = (id(metric), values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child
