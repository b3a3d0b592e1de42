"""The rows and cards the dashboard's pages show: frozen values built by ``data``."""

from __future__ import annotations

from dataclasses import dataclass

from agentmesh.models import AgentRecord, CapabilityOffer, CapabilitySpec

__all__ = [
    "AgentView",
    "CapabilityView",
    "EdgeView",
    "Golden",
    "InstanceView",
    "Summary",
    "TopologyEdge",
    "TopologyNode",
    "TopologyView",
]


@dataclass(frozen=True, slots=True)
class Golden:
    """Golden metrics of one agent, capability or edge over the stats window."""

    requests: int
    rps: float
    success: float | None  # fraction of successful calls, None without calls
    p50: float | None  # seconds
    p95: float | None
    p99: float | None


@dataclass(frozen=True, slots=True)
class InstanceView:
    record: AgentRecord
    ejected_by: list[str]
    probing_by: list[str]
    age: str

    @property
    def health(self) -> str:
        """serving / unready / draining, or ``ejected`` when some sidecar's breaker is open."""
        if self.ejected_by:
            return "ejected"
        if self.probing_by:
            return "probing"
        return self.record.status


@dataclass(frozen=True, slots=True)
class AgentView:
    name: str
    instances: list[InstanceView]
    golden: Golden | None

    @property
    def versions(self) -> list[str]:
        return sorted({i.record.version for i in self.instances})

    @property
    def capabilities(self) -> list[str]:
        return sorted({c.name for i in self.instances for c in i.record.capabilities})

    @property
    def health(self) -> str:
        """``ok`` if every instance serves, ``bad`` if none does, else ``warn``."""
        serving = sum(1 for i in self.instances if i.health == "serving")
        if serving == len(self.instances):
            return "ok"
        return "bad" if serving == 0 else "warn"


@dataclass(frozen=True, slots=True)
class CapabilityView:
    name: str
    offers: list[CapabilityOffer]
    golden: Golden | None

    @property
    def spec(self) -> CapabilitySpec:
        """The spec of the newest version on offer (what the try-it form shows)."""
        from packaging.version import Version

        return max((o.capability for o in self.offers), key=lambda s: Version(s.version))

    @property
    def versions(self) -> list[str]:
        return sorted({o.capability.version for o in self.offers})

    @property
    def agents(self) -> list[str]:
        return sorted({o.agent for o in self.offers})

    @property
    def serving(self) -> int:
        return sum(1 for o in self.offers if o.status == "serving")


@dataclass(frozen=True, slots=True)
class EdgeView:
    """Calls from one caller to one callee agent (``-``: no live instance was found)."""

    caller: str
    callee: str
    golden: Golden


@dataclass(frozen=True, slots=True)
class TopologyEdge:
    """One arrow of the graph: the calls ``caller`` makes to ``callee``."""

    caller: str
    callee: str
    golden: Golden | None
    breaker: str  # "closed", "probing" (half-open somewhere) or "open" (an instance ejected)
    mtls: bool
    path: str
    label_x: float
    label_y: float


@dataclass(frozen=True, slots=True)
class TopologyNode:
    name: str
    external: bool  # a caller that is not a registered agent (a script, the control plane)
    health: str
    subtitle: str
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class TopologyView:
    nodes: list[TopologyNode]
    edges: list[TopologyEdge]
    rows: list[EdgeView]
    width: float
    height: float
    has_stats: bool


@dataclass(frozen=True, slots=True)
class Summary:
    agents: int
    instances: int
    serving: int
    capabilities: int
    ejected: int
    golden: Golden | None
