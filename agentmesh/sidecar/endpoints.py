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

from agentmesh._config import BreakerConfig
from agentmesh.registry.index import LocalIndex, Target
from agentmesh.sidecar.breaker import Breaker, BreakerState, ejected_ratio
from agentmesh.telemetry.metrics import BREAKER_STATE, BREAKER_TRANSITIONS

__all__ = ["EWMA_DECAY", "LATENCY_FLOOR", "Candidates", "EndpointState", "Endpoints"]

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
    counted: bool = False
    """The balancer has considered this endpoint, so the ejection cap counts it."""
    closed: bool = True
    """``breaker`` is closed (kept by its transitions): the balancer's draws read this flag
    instead of the breaker object, one cache miss fewer per draw with thousands of endpoints."""

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
        """What P2C compares: expected latency times the queue it would join.

        ``rtt`` and ``max`` written out: this runs twice per call on the balancer's hot path.
        """
        rtt = self._rtt * math.exp((self._stamp - now) / EWMA_DECAY)
        return (rtt if rtt > LATENCY_FLOOR else LATENCY_FLOOR) * (self.in_flight + 1)


Candidates = tuple[tuple[Target, ...], tuple[EndpointState, ...]]
"""Serving targets and their states, position for position (``Endpoints.candidates``)."""


class Endpoints:
    """instance id → EndpointState, made ahead of the calls that need it, dropped as it leaves.

    States are made for every instance of a capability at its first call, and then for each new
    instance of it as its record arrives, so no call but a capability's first makes one (that
    allocation showed up in the resolve p99 with 10,000 endpoints). Not for every record of the
    index: with 10,000 records that is time and memory spent mostly on capabilities never called.
    """

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
        """The endpoints the balancer has considered (``counted``): what the ejection cap counts."""
        self._ready: dict[str, EndpointState] = {}
        """States made for indexed instances the balancer has not considered yet."""
        self._candidates: dict[str, tuple[tuple[Target, ...], Candidates]] = {}
        """capability → the index's targets it was built from, and its candidates."""
        self._called: set[str] = set()
        """Capabilities the balancer has chosen for: their new instances get states at once."""
        index.on_change(self._sync)

    def get(self, instance_id: str) -> EndpointState:
        """The endpoint's state, counted from now on as one the balancer has considered."""
        state = self.states.get(instance_id)
        if state is None:
            state = self._ready.pop(instance_id, None) or self._new_state(instance_id)
            state.counted = True
            self.states[instance_id] = state
        return state

    def candidates(self, capability: str, targets: tuple[Target, ...]) -> Candidates:
        """The serving ones among ``targets``, and their states, position for position.

        What the balancer samples from without a lookup per draw. Kept for the index's own
        targets of each capability, made on the first call after each index change; a filtered
        subset (a version constraint, a split) gets a fresh pair. The states are not marked
        ``counted``: the balancer counts each one it considers, with ``get``.
        """
        entry = self._candidates.get(capability)
        if entry is not None and entry[0] is targets:
            return entry[1]
        self._called.add(capability)
        serving = tuple(t for t in targets if t.serving)
        candidates = serving, tuple(self._peek(t.instance_id) for t in serving)
        if targets is self._index.targets(capability):
            self._candidates[capability] = (targets, candidates)
        return candidates

    def _peek(self, instance_id: str) -> EndpointState:
        """The endpoint's state, created if need be, without counting it as considered."""
        state = self.states.get(instance_id) or self._ready.get(instance_id)
        if state is None:
            state = self._ready[instance_id] = self._new_state(instance_id)
        return state

    def _new_state(self, instance_id: str) -> EndpointState:
        transitions = _Transitions(instance_id, self._on_breaker_change)
        state = transitions.state = EndpointState(
            instance_id, Breaker(self._breaker, clock=self._clock, on_change=transitions)
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

    def _new_breaker(self, instance_id: str, config: BreakerConfig) -> Breaker:
        on_change = _Transitions(instance_id, self._on_breaker_change)
        return Breaker(config, clock=self._clock, on_change=on_change)

    def may_eject(self, max_ratio: float) -> bool:
        """Whether one more ejection keeps the ejected share within ``max_ratio``.

        At least one endpoint may always be ejected, so a lone dead replica fails fast.
        """
        breakers = [s.breaker for s in self.states.values()]
        ejected = round(ejected_ratio(breakers) * len(breakers))
        return ejected < max(1, math.floor(max_ratio * len(breakers)))

    def _sync(self) -> None:
        """Drop the states of instances that left; make them for new ones of called capabilities.

        A capability whose targets tuple is the same object as before did not change (the index
        makes a new one for every change to it), so its candidates are kept as they are.
        """
        before, self._candidates = self._candidates, {}
        live = self._index.instance_ids()
        for instance_id in [i for i in self.states if i not in live]:
            del self.states[instance_id]
            _forget_labels(instance_id)
        ready = self._ready
        for instance_id in [i for i in ready if i not in live]:
            del ready[instance_id]
        for capability in self._called:
            targets = self._index.targets(capability)
            entry = before.get(capability)
            if entry is not None and entry[0] is targets:
                self._candidates[capability] = entry
                continue
            for target in targets:
                self._peek(target.instance_id)


def _forget_labels(instance_id: str) -> None:
    """Drop a gone instance's breaker metrics: instance ids churn with every restart, and a
    label value kept for ever would grow the exposition (and memory) without end."""
    with contextlib.suppress(KeyError):
        BREAKER_STATE.remove(instance_id)
    for state in _GAUGE:
        with contextlib.suppress(KeyError):
            BREAKER_TRANSITIONS.remove(instance_id, state)


class _Transitions:
    """A breaker's ``on_change``: metrics, the sidecar's listener and ``EndpointState.closed``.

    One small object rather than closures: states are made by the hundred at a capability's
    first call, and fewer objects per state means fewer garbage-collector passes then.
    """

    __slots__ = ("instance_id", "listener", "state")

    def __init__(
        self,
        instance_id: str,
        listener: Callable[[str, BreakerState, BreakerState], None] | None,
    ) -> None:
        self.instance_id = instance_id
        self.listener = listener
        self.state: EndpointState | None = None
        """Set for the endpoint's default breaker only (not a TrafficPolicy's override)."""

    def __call__(self, old: BreakerState, new: BreakerState) -> None:
        if self.state is not None:
            self.state.closed = new == "closed"
        BREAKER_STATE.labels(self.instance_id).set(_GAUGE[new])
        BREAKER_TRANSITIONS.labels(self.instance_id, new).inc()
        if self.listener is not None:
            self.listener(self.instance_id, old, new)
