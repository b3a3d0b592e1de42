"""What sidecars report and the control plane aggregates: breaker events, call statistics,
tap requests and events.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from agentmesh.models._base import Wire

__all__ = [
    "BreakerEvent",
    "EndpointHealth",
    "StatGroup",
    "StatRow",
    "StatsEntry",
    "StatsReport",
    "TapAck",
    "TapEvent",
    "TapRequest",
]


class BreakerEvent(Wire):
    """A sidecar's circuit breaker for one endpoint changed state (published on NATS)."""

    observer: str
    instance_id: str
    state: Literal["closed", "open", "half_open"]
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class EndpointHealth(Wire):
    """What the sidecars report about one instance: who currently ejects it."""

    instance_id: str
    ejected_by: list[str] = Field(default_factory=list)
    probing_by: list[str] = Field(default_factory=list)


class StatsEntry(Wire):
    """One key of a sidecar's interval: how many calls, their total time and latency histogram.

    ``buckets`` is sparse: ``[index, count]`` pairs over the fixed log-spaced bounds named by
    the report's ``scheme`` (see ``agentmesh.telemetry.stats``).
    """

    direction: Literal["outbound", "inbound"]
    agent: str = Field(max_length=128, description="outbound: the caller; inbound: the server")
    capability: str = Field(max_length=256)
    peer: str = Field(
        default="-", max_length=128, description="outbound: the callee agent ('-': none reached)"
    )
    status: str = Field(max_length=64, description="outbound: ok or error; inbound: HTTP status")
    count: int = Field(ge=0)
    total: float = Field(ge=0, description="Sum of the calls' durations, in seconds")
    buckets: list[tuple[int, int]] = Field(default_factory=list)


class StatsReport(Wire):
    """What one sidecar saw during one interval, published on ``agentmesh.stats.<bucket>``."""

    reporter: str = Field(max_length=128, description="The sidecar (an agent's instance id)")
    scheme: str
    start: datetime
    end: datetime
    entries: list[StatsEntry]


#: How ``/v1/stats`` groups calls: per serving agent, per capability, per caller→callee edge.
StatGroup = Literal["agents", "capabilities", "edges"]


class StatRow(Wire):
    """Golden metrics of one agent, capability or edge over a window (``GET /v1/stats``)."""

    group: StatGroup
    name: str
    caller: str | None = None
    callee: str | None = None
    window: float = Field(description="Seconds of data the numbers cover")
    requests: int
    failures: int
    rps: float
    success_rate: float | None = Field(description="0..1; null without requests")
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


class TapRequest(Wire):
    """``agentmesh tap`` asks the sidecars serving ``capability`` to publish its calls.

    Re-sent every second; a sidecar stops publishing ``ttl`` seconds after the last one.
    """

    capability: str = Field(max_length=256)
    payloads: bool = False
    ttl: float = Field(default=3.0, gt=0, le=60)
    tapper: str = Field(default="-", max_length=128)


class TapAck(Wire):
    """A sidecar's answer to a :class:`TapRequest`: it publishes, with or without payloads."""

    instance_id: str
    agent: str
    payloads: bool


class TapEvent(Wire):
    """One call, as the serving sidecar saw it, on ``agentmesh.tap.<bucket>.<capability>``."""

    at: datetime
    capability: str
    agent: str
    instance_id: str
    caller: str
    status: int
    duration_ms: float
    trace_id: str | None = None
    request: str | None = None
    response: str | None = None
