"""The control plane's book of who ejects whom: bounded, whatever the sidecars send."""

from __future__ import annotations

from agentmesh.control.health import HealthBook
from agentmesh.models import BreakerEvent
from agentmesh.sidecar.breaker import BreakerState


def _event(observer: int, instance: str, state: BreakerState = "open") -> BreakerEvent:
    return BreakerEvent(observer=f"a-{observer:08x}", instance_id=instance, state=state)


def test_breaker_states_stay_bounded_and_stale_ones_make_room() -> None:
    now = [0.0]
    book = HealthBook(clock=lambda: now[0], max_states=3)
    for i in range(5):  # an agent flooding events about made-up instances
        book.add(_event(i, f"x{i}"))
    ids = [f"x{i}" for i in range(5)]
    assert [h.ejected_by for h in book.health(ids)] == [
        ["a-00000000"],
        ["a-00000001"],
        ["a-00000002"],
        [],
        [],
    ]
    book.add(_event(0, "x0", "half_open"))  # a state already kept still changes
    assert book.health(["x0"])[0].probing_by == ["a-00000000"]
    book.add(_event(1, "x1", "closed"))  # a closed breaker frees its place
    book.add(_event(3, "x3"))
    assert book.health(["x3"])[0].ejected_by == ["a-00000003"]
    now[0] = 61.0  # past the minute after which reports are forgotten: room again
    book.add(_event(4, "x4"))
    assert [h.ejected_by for h in book.health(ids)] == [[], [], [], [], ["a-00000004"]]
