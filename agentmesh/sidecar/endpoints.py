"""What the sidecar knows of each endpoint it calls: load, latency, breaker.

Shared by the layers that look at one endpoint (balance reads it to choose, the breaker layer
writes outcomes into it) and by the metrics and CLI that show it. Entries live exactly as long as
their instance is in the registry index.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agentmesh.registry.index import LocalIndex
from agentmesh.sidecar.breaker import Breaker, BreakerConfig, BreakerState, ejected_ratio
from agentmesh.telemetry.metrics import BREAKER_STATE, BREAKER_TRANSITIONS

__all__ = ["EWMA_DECAY", "LATENCY_FLOOR", "EndpointState", "Endpoints"]

#: Latencies below this are noise for balancing: a local call's few hundred microseconds and a
#: busy host's scheduling hiccups say nothing about the replica. Without the floor, P2C would
#: send all serial traffic to whichever replica happened to answer a little faster, and one
#: hiccup would shun a replica for seconds; with it, equal replicas share the load (ties go by
#: in-flight calls, then at random) and only a replica that is really slower is avoided. New
#: replicas start at the floor, so they get traffic at once. Agent calls (tens of milliseconds
#: to minutes) are well above it.
LATENCY_FLOOR = 0.025
_GAUGE: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}
#: Peak-EWMA time constant (Linkerd's default decay): a latency spike is remembered for a few
#: seconds, then forgotten, so a replica that was slow once is tried again.
EWMA_DECAY = 10.0


@dataclass(slots=True, eq=False)
class EndpointState:
    instance_id: str
    breaker: Breaker
    in_flight: int = 0
    calls: int = 0
    failures: int = 0
    _rtt: float = 0.0
    _stamp: float = field(default_factory=time.monotonic)
    overrides: dict[BreakerConfig, Breaker] = field(default_factory=dict)
    """Breakers with a TrafficPolicy's thresholds, for the calls of capabilities that set them."""

    def rtt(self, now: float) -> float:
        """The peak-EWMA latency estimate, decayed toward zero while nothing is observed."""
        return self._rtt * math.exp(-(now - self._stamp) / EWMA_DECAY)

    def observe(self, rtt: float, now: float) -> None:
        """Peak EWMA: a slower sample takes over at once, faster ones pull it down slowly."""
        current = self.rtt(now)
        if rtt >= current:
            self._rtt = rtt
        else:
            weight = math.exp(-(now - self._stamp) / EWMA_DECAY)
            self._rtt = current * weight + rtt * (1 - weight)
        self._stamp = now

    def cost(self, now: float) -> float:
        """What P2C compares: expected latency times the queue it would join."""
        return max(self.rtt(now), LATENCY_FLOOR) * (self.in_flight + 1)


class Endpoints:
    """instance id → EndpointState, pruned as the registry index changes."""

    def __init__(
        self,
        index: LocalIndex,
        *,
        breaker: BreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_breaker_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self._index = index
        self._breaker = breaker or BreakerConfig()
        self._clock = clock
        self._on_breaker_change = on_breaker_change
        self.states: dict[str, EndpointState] = {}
        index.on_change(self._prune)

    def get(self, instance_id: str) -> EndpointState:
        state = self.states.get(instance_id)
        if state is None:
            state = self.states[instance_id] = EndpointState(
                instance_id, self._new_breaker(instance_id)
            )
        return state

    def breaker(self, instance_id: str, config: BreakerConfig | None = None) -> Breaker:
        """The endpoint's breaker; with ``config`` (a TrafficPolicy's), one with those settings.

        An override breaker judges only the calls of the capabilities whose policy set it, so
        stricter thresholds for one capability never eject an endpoint for the others.
        """
        state = self.get(instance_id)
        if config is None or config == self._breaker:
            return state.breaker
        breaker = state.overrides.get(config)
        if breaker is None:
            if len(state.overrides) >= 16:  # old policies' settings: drop, never grow unbounded
                state.overrides.clear()
            breaker = state.overrides[config] = self._new_breaker(instance_id, config)
        return breaker

    def _new_breaker(self, instance_id: str, config: BreakerConfig | None = None) -> Breaker:
        def changed(old: BreakerState, new: BreakerState) -> None:
            BREAKER_STATE.labels(instance_id).set(_GAUGE[new])
            BREAKER_TRANSITIONS.labels(instance_id, new).inc()
            if self._on_breaker_change is not None:
                self._on_breaker_change(instance_id, old, new)

        return Breaker(config or self._breaker, clock=self._clock, on_change=changed)

    def may_eject(self, max_ratio: float) -> bool:
        """Whether one more ejection keeps the ejected share within ``max_ratio``.

        At least one endpoint may always be ejected, so a lone dead replica fails fast.
        """
        breakers = [s.breaker for s in self.states.values()]
        ejected = round(ejected_ratio(breakers) * len(breakers))
        return ejected < max(1, math.floor(max_ratio * len(breakers)))

    def _prune(self) -> None:
        live = {r.instance_id for r in self._index.records()}
        for instance_id in [i for i in self.states if i not in live]:
            del self.states[instance_id]
            with contextlib.suppress(KeyError):
                BREAKER_STATE.remove(instance_id)
