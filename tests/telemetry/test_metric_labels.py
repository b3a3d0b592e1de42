"""Metric labels come from a bounded set: a caller's made-up capability names add none."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from agentmesh import CapabilityNotFound, Mesh

NAMES = [f"made-up-{i}" for i in range(200)]


def capability_labels(family: str) -> set[str]:
    return {
        sample.labels["capability"]
        for metric in REGISTRY.collect()
        if metric.name == family
        for sample in metric.samples
        if "capability" in sample.labels
    }


async def test_calls_to_names_nobody_serves_share_one_label(mesh: Mesh):
    unknown = {"caller": "client", "capability": "_unknown", "callee": "-"}
    before = REGISTRY.get_sample_value(
        "agentmesh_outbound_requests_total", {**unknown, "status": "capability_not_found"}
    )
    for name in NAMES:  # an LLM's tool calls, say: any string an app passes on
        with pytest.raises(CapabilityNotFound):
            await mesh.call(name)
    after = REGISTRY.get_sample_value(
        "agentmesh_outbound_requests_total", {**unknown, "status": "capability_not_found"}
    )
    assert after - (before or 0.0) == len(NAMES)
    for family in ("agentmesh_outbound_requests", "agentmesh_outbound_latency_seconds"):
        assert not capability_labels(family) & set(NAMES), family
