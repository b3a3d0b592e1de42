"""The local index fed by hand (no NATS): watch events update only what they touch."""

from __future__ import annotations

import random

from agentmesh import AgentRecord, CapabilitySpec
from agentmesh.models import AgentStatus
from agentmesh.registry import LocalIndex


def value(instance: str, *capabilities: str, status: AgentStatus = "serving") -> bytes:
    specs = tuple(
        CapabilitySpec(name=name, input_schema={}, output_schema={}, version=f"1.{len(name)}.0")
        for name in capabilities
    )
    return (
        AgentRecord(
            instance_id=instance,
            name="a",
            endpoint="http://127.0.0.1:9000",
            capabilities=specs,
            status=status,
        )
        .model_dump_json()
        .encode()
    )


def view(index: LocalIndex) -> dict[str, list[tuple[str, str, str, bool]]]:
    return {
        name: [(t.instance_id, t.spec.name, str(t.version), t.serving) for t in index.targets(name)]
        for name in index.capabilities()
    }


def test_watch_events_give_the_same_view_as_a_fresh_snapshot() -> None:
    rng = random.Random(5)
    names = ["plan", "summarize", "search", "rank"]
    index = LocalIndex()
    changes: list[int] = []
    index.on_change(lambda: changes.append(index.revision))
    current: dict[str, bytes] = {}
    for step in range(300):
        instance = f"a-{rng.randrange(12)}"
        key = f"a.{instance}"  # registry keys are <agent name>.<instance id>
        if rng.random() < 0.3:
            current.pop(key, None)
            index.apply(key, None)
        else:
            status: AgentStatus = rng.choice(["serving", "serving", "draining"])
            current[key] = value(instance, *rng.sample(names, rng.randint(1, 3)), status=status)
            index.apply(key, current[key])
        fresh = LocalIndex()
        fresh.replace(dict(current))
        assert view(index) == view(fresh), step
        assert sorted(index.instance_ids()) == sorted(k.split(".")[1] for k in current)
    assert changes == sorted(set(changes))  # one revision per change, in order


def test_an_event_leaves_other_capabilities_untouched() -> None:
    index = LocalIndex()
    index.replace({"a.a-1": value("a-1", "plan"), "a.a-2": value("a-2", "search")})
    search = index.targets("search")
    index.apply("a.a-3", value("a-3", "plan"))
    assert index.targets("search") is search
    assert [t.instance_id for t in index.targets("plan")] == ["a-1", "a-3"]
    index.apply("a.a-1", None)
    index.apply("a.a-3", None)
    assert index.capabilities() == ["search"]
    assert index.targets("plan") == ()


def test_a_record_under_another_agents_key_cannot_take_over_an_instance() -> None:
    """Agent "b" may write only under ``b.>`` (NATS permissions); a record it writes there
    naming a live instance of "a" is ignored, and deleting it leaves a's instance alone."""
    index = LocalIndex()
    index.apply("a.a-1", value("a-1", "plan"))
    forged = value("a-1", "plan").replace(b'"name":"a"', b'"name":"b"')
    index.apply("b.a-1", forged)
    index.apply("b.a-1", None)
    assert [(t.instance_id, t.record.name) for t in index.targets("plan")] == [("a-1", "a")]
    index.apply("a.a-1", value("a-1", "search"))  # a record's key must name its own agent
    index.apply("b.b-1", value("b-1", "plan"))
    assert [t.instance_id for t in index.targets("search")] == ["a-1"]
    assert index.targets("plan") == ()
