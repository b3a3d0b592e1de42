"""Breaker metrics of instances that left the index are dropped: churn grows no label set."""

from __future__ import annotations

from uuid import uuid4

from prometheus_client import REGISTRY

from agentmesh import AgentRecord, CapabilitySpec
from agentmesh.registry.index import LocalIndex
from agentmesh.sidecar.endpoints import Endpoints

CHURN = 200


def value(instance: str) -> bytes:
    spec = CapabilitySpec(name="cap", input_schema={}, output_schema={})
    record = AgentRecord(
        instance_id=instance, name="churn", endpoint="http://127.0.0.1:8000", capabilities=(spec,)
    )
    return record.model_dump_json().encode()


def instances_in_breaker_metrics() -> set[str]:
    return {
        sample.labels["instance"]
        for metric in REGISTRY.collect()
        if metric.name in ("agentmesh_breaker_state", "agentmesh_breaker_transitions")
        for sample in metric.samples
    }


def test_instances_that_leave_take_their_breaker_labels_with_them() -> None:
    run = uuid4().hex[:8]  # label values unique to this test: the registry is process-wide
    index = LocalIndex()
    endpoints = Endpoints(index)
    index.apply(f"churn.{run}-live", value(f"{run}-live"))
    endpoints.get(f"{run}-live").breaker.force_open(60)
    for i in range(CHURN):  # agents restarting, or one re-registering under new ids
        instance = f"{run}-{i}"
        index.apply(f"churn.{instance}", value(instance))
        breaker = endpoints.get(instance).breaker
        breaker.force_open(60)
        breaker.reset()
        index.apply(f"churn.{instance}", None)
    mine = {i for i in instances_in_breaker_metrics() if i.startswith(run)}
    assert mine == {f"{run}-live"}
