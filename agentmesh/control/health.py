"""What the sidecars report about endpoints: which of them currently eject which instance.

Each sidecar publishes its breaker transitions on NATS; the control plane keeps the latest state
per (observer, instance) and forgets reports older than a minute (an observer that died cannot
report its breaker closing), so ``agentmesh agents`` can show "ejected by 2 sidecars".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from pydantic import ValidationError

from agentmesh.models import BreakerEvent, EndpointHealth

__all__ = ["HealthBook"]

#: Reports older than this are dropped: longer than the longest ejection (30 s), so a breaker
#: that stays open is refreshed by its probes' transitions before it is forgotten.
_FORGET_AFTER = 60.0
#: (instance, observer) states kept at most: an agent may send breaker events about any
#: instance id, so past this the stale ones are forgotten first, then new ones are dropped
#: (a mesh's real ejections are a few per instance).
_MAX_STATES = 10_000


class HealthBook:
    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_states: int = _MAX_STATES
    ) -> None:
        self._clock = clock
        self._max_states = max_states
        self._states: dict[str, dict[str, tuple[str, float]]] = {}

    def apply(self, data: bytes) -> None:
        """Add one event as JSON; malformed data is ignored."""
        try:
            event = BreakerEvent.model_validate_json(data)
        except ValidationError:
            return
        self.add(event)

    def add(self, event: BreakerEvent) -> None:
        """Add one event, already parsed (and checked: ``agentmesh.control.feed``)."""
        now = self._clock()
        observers = self._states.get(event.instance_id)
        if event.state == "closed":
            if observers is not None:
                observers.pop(event.observer, None)
                if not observers:
                    del self._states[event.instance_id]
            return
        if (observers is None or event.observer not in observers) and self._full(now):
            return
        self._states.setdefault(event.instance_id, {})[event.observer] = (event.state, now)

    def _full(self, now: float) -> bool:
        """Whether a new state would pass the bound, once the stale ones are forgotten."""
        if sum(map(len, self._states.values())) < self._max_states:
            return False
        oldest = now - _FORGET_AFTER
        for instance_id, observers in list(self._states.items()):
            fresh = {o: v for o, v in observers.items() if v[1] >= oldest}
            if fresh:
                self._states[instance_id] = fresh
            else:
                del self._states[instance_id]
        return sum(map(len, self._states.values())) >= self._max_states

    def health(self, instance_ids: Iterable[str]) -> list[EndpointHealth]:
        oldest = self._clock() - _FORGET_AFTER
        out = []
        for instance_id in instance_ids:
            observers = self._states.get(instance_id, {})
            fresh = {o: s for o, (s, at) in observers.items() if at >= oldest}
            out.append(
                EndpointHealth(
                    instance_id=instance_id,
                    ejected_by=sorted(o for o, s in fresh.items() if s == "open"),
                    probing_by=sorted(o for o, s in fresh.items() if s == "half_open"),
                )
            )
        return out
