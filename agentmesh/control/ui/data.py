"""Where every number on a dashboard page comes from: one method of :class:`DashboardData`.

Agents and instances from the control plane's watch-fed registry index, breaker ejections from
the :class:`HealthBook`, golden metrics from the stats book (when the control plane has one),
policies and identities from the control plane's own ``/v1`` API.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from fastapi import Request
from starlette.types import ASGIApp

from agentmesh.control.health import HealthBook
from agentmesh.control.layout import GraphLayout, layered_layout
from agentmesh.control.nats_status import NatsView, nats_view
from agentmesh.control.stats import StatsBook
from agentmesh.control.ui.listing import ApiListing, api_listing, policy_row
from agentmesh.control.ui.views import (
    AgentView,
    CapabilityView,
    EdgeView,
    Golden,
    InstanceView,
    Summary,
    TopologyEdge,
    TopologyNode,
    TopologyView,
)
from agentmesh.models import CapabilityOffer, StatGroup, StatRow
from agentmesh.sidecar.sidecar import Sidecar

__all__ = ["STATS_WINDOW", "DashboardData", "golden_of"]

#: The window of the golden metrics shown, in seconds.
STATS_WINDOW = 60.0


def _age(started: datetime, now: datetime) -> str:
    seconds = max(int((now - started).total_seconds()), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def golden_of(row: StatRow) -> Golden:
    def seconds(ms: float | None) -> float | None:
        return None if ms is None else ms / 1000

    return Golden(
        requests=row.requests,
        rps=row.rps,
        success=row.success_rate,
        p50=seconds(row.p50_ms),
        p95=seconds(row.p95_ms),
        p99=seconds(row.p99_ms),
    )


class DashboardData:
    """Where every page's data comes from: one method per page section."""

    def __init__(
        self,
        sidecar: Sidecar,
        health: HealthBook,
        stats: StatsBook | None = None,
        *,
        api: ASGIApp | None = None,
        window: float = STATS_WINDOW,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.sidecar = sidecar
        self.health = health
        self.stats = stats
        #: The control plane's API app, asked in-process for policies and identities.
        self.api = api
        self.window = window
        self._clock = clock

    # ---- golden metrics -----------------------------------------------------------------------

    def _stats_rows(self, group: StatGroup) -> list[StatRow]:
        return [] if self.stats is None else self.stats.rows(group, self.window)

    def agent_golden(self) -> dict[str, Golden]:
        """What each agent served (inbound calls, all its instances)."""
        return {row.name: golden_of(row) for row in self._stats_rows("agents")}

    def capability_golden(self) -> dict[str, Golden]:
        """What callers asked of each capability (outbound calls, failed resolutions included)."""
        return {row.name: golden_of(row) for row in self._stats_rows("capabilities")}

    def edges(self) -> list[EdgeView]:
        """Calls caller → callee, as the callers' sidecars reported them."""
        return [
            EdgeView(row.caller, row.callee, golden_of(row))
            for row in self._stats_rows("edges")
            if row.caller is not None and row.callee is not None
        ]

    def total_golden(self) -> Golden | None:
        rows = list(self.agent_golden().values())
        if not rows:
            return None
        return _merge(rows)

    # ---- registry and health ------------------------------------------------------------------

    def instances(self) -> list[InstanceView]:
        records = self.sidecar.index.records()
        health = {h.instance_id: h for h in self.health.health(r.instance_id for r in records)}
        now = self._clock()
        return [
            InstanceView(
                record=r,
                ejected_by=health[r.instance_id].ejected_by,
                probing_by=health[r.instance_id].probing_by,
                age=_age(r.started_at, now),
            )
            for r in records
        ]

    def agents(self) -> list[AgentView]:
        golden = self.agent_golden()
        by_name: dict[str, list[InstanceView]] = defaultdict(list)
        for instance in self.instances():
            by_name[instance.record.name].append(instance)
        return [AgentView(n, by_name[n], golden.get(n)) for n in sorted(by_name)]

    def capabilities(self) -> list[CapabilityView]:
        golden = self.capability_golden()
        offers: dict[str, list[CapabilityOffer]] = defaultdict(list)
        for offer in self.sidecar.index.find():
            offers[offer.capability.name].append(offer)
        return [CapabilityView(n, offers[n], golden.get(n)) for n in sorted(offers)]

    def capability(self, name: str) -> CapabilityView | None:
        offers = self.sidecar.index.find(name)
        if not offers:
            return None
        return CapabilityView(name, offers, self.capability_golden().get(name))

    def nats(self) -> NatsView:
        """The overview's NATS card: the embedded server's supervisor state, else the link."""
        return nats_view(self.sidecar.conn, getattr(self.api, "state", None))

    def summary(self) -> Summary:
        instances = self.instances()
        return Summary(
            agents=len({i.record.name for i in instances}),
            instances=len(instances),
            serving=sum(1 for i in instances if i.health == "serving"),
            capabilities=len(self.sidecar.index.capabilities()),
            ejected=sum(1 for i in instances if i.ejected_by),
            golden=self.total_golden(),
        )

    def topology(self) -> TopologyView:
        agents = {a.name: a for a in self.agents()}
        rows = self.edges()
        pairs = {(row.caller, row.callee): row for row in rows}
        layout: GraphLayout = layered_layout(agents, pairs)
        nodes = []
        for name, box in sorted(layout.nodes.items()):
            agent = agents.get(name)
            if name == "-":
                health, subtitle = "bad", "no live instance"
            elif agent is None:
                health, subtitle = "none", "caller (not an agent)"
            else:
                count = len(agent.instances)
                health = agent.health
                subtitle = f"{count} instance{'s' if count != 1 else ''}"
                if agent.golden is not None and agent.golden.requests:
                    subtitle += f" · {agent.golden.rps:.2g}/s in"
            nodes.append(
                TopologyNode(
                    name, agent is None, health, subtitle, box.x, box.y, box.width, box.height
                )
            )
        edges = []
        for geometry in layout.edges:
            key = (geometry.source, geometry.target)
            callee = agents.get(geometry.target)
            instances = callee.instances if callee else []
            if any(i.ejected_by for i in instances):
                breaker = "open"
            elif any(i.probing_by for i in instances):
                breaker = "probing"
            else:
                breaker = "closed"
            mtls = bool(instances) and all(
                i.record.identity and i.record.endpoint.startswith("https://") for i in instances
            )
            edges.append(
                TopologyEdge(
                    caller=key[0],
                    callee=key[1],
                    golden=pairs[key].golden,
                    breaker=breaker,
                    mtls=mtls,
                    path=geometry.path,
                    label_x=geometry.label_x,
                    label_y=geometry.label_y,
                )
            )
        return TopologyView(
            nodes, edges, rows, layout.width, layout.height, has_stats=self.stats is not None
        )

    # ---- APIs other parts of the control plane provide ----------------------------------------

    async def policies(self, request: Request) -> ApiListing:
        """The access and traffic policies (``GET /v1/policies``), once that API exists."""
        return await api_listing(
            self.api, request, "/v1/policies", shape=policy_row, full=("spec",)
        )

    async def identities(self, request: Request) -> ApiListing:
        """The agent identities (``GET /v1/identities``), once that API exists."""
        return await api_listing(self.api, request, "/v1/identities")


def _merge(rows: Iterable[Golden]) -> Golden:
    """Sum rates; weight success by requests; latency quantiles: the worst (an upper bound)."""
    items = list(rows)
    requests = sum(g.requests for g in items)
    successes = sum(g.success * g.requests for g in items if g.success is not None)

    def worst(values: Iterable[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return max(present) if present else None

    return Golden(
        requests=requests,
        rps=sum(g.rps for g in items),
        success=successes / requests if requests else None,
        p50=worst(g.p50 for g in items),
        p95=worst(g.p95 for g in items),
        p99=worst(g.p99 for g in items),
    )
