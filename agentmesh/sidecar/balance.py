"""Balance: choose one endpoint for this attempt.

The default is power of two choices on peak-EWMA latency × in-flight calls (Linkerd's and
Envoy's least-request P2C): pick two endpoints at random, send to the cheaper one. It needs no
global view, spreads idle load evenly and steers away from a replica that is slow or piling up
work. Also available: ``round_robin``, ``random``, and — for calls with an ``affinity_key`` —
rendezvous hashing, so one conversation sticks to one instance while it lives and only its keys
move when it dies.

Only instances whose record says ``serving`` are candidates (draining and unready ones keep
their in-flight calls but get no new ones); instances ejected by their breaker are skipped;
instances that already failed this call are avoided when others exist. With a ``zone``, the
sidecar prefers endpoints labelled with the same zone and fails over to the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import time
from collections.abc import AsyncGenerator, Callable

from agentmesh._config import BreakerConfig, Strategy
from agentmesh.errors import NoHealthyEndpoints
from agentmesh.registry.index import Target
from agentmesh.sidecar.call import Handler, OutboundCall, Reply
from agentmesh.sidecar.endpoints import Endpoints, EndpointState

__all__ = ["BalanceLayer", "Strategy"]

#: Below this many targets the full scan is as cheap as sampling (and exact).
_SAMPLE_FIRST = 8


class BalanceLayer:
    def __init__(
        self,
        inner: Handler,
        endpoints: Endpoints,
        *,
        strategy: Strategy = "p2c",
        zone: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self.endpoints = endpoints
        self.strategy = strategy
        self.zone = zone
        self._rng = rng or random.Random()
        self._clock = clock
        self._turns: dict[str, itertools.count[int]] = {}

    def choose(self, call: OutboundCall) -> Target:
        traffic = call.traffic
        config = traffic.breaker if traffic is not None else None
        strategy = (traffic.balance if traffic is not None else None) or self.strategy
        if (
            strategy == "p2c"
            and len(call.targets) > _SAMPLE_FIRST
            and call.affinity_key is None
            and not call.excluded
            and self.zone is None
        ):
            chosen = self._sampled_p2c(call.capability, call.targets, config)
            if chosen is not None:
                return chosen
        return self._choose_among_all(call, config, strategy)

    def _sampled_p2c(
        self, capability: str, targets: tuple[Target, ...], config: BreakerConfig | None
    ) -> Target | None:
        """The cheaper of two distinct healthy targets drawn at random, without scanning them all.

        With many instances, filtering every one (status, breaker) costs O(n) per call; P2C only
        needs two, so draw a few and fall back to the full scan (None) if too many draws are
        unhealthy. This is the hot path with many instances, and with thousands of endpoints its
        cost is mostly cache misses, so a draw touches one object: the state of a serving
        target, by position in ``Endpoints.candidates``, not by a lookup in a dictionary of every
        endpoint (sampling among the serving is what drawing among all and skipping the others
        did). ``random()`` scaled to an index costs a third of ``randrange``; its bias
        (n / 2**53) is negligible.
        """
        endpoints = self.endpoints
        serving, states = endpoints.candidates(capability, targets)
        n = len(serving)
        if n < 2:
            return None
        random = self._rng.random
        first = -1
        first_state: EndpointState | None = None
        for _ in range(8):
            i = int(random() * n)
            if i == first:
                continue
            state = states[i]
            if not state.counted:
                endpoints.get(state.instance_id)
            if config is None:
                if not state.closed and not state.breaker.available():
                    continue
            elif not endpoints.breaker(state.instance_id, config).available():
                continue
            if first_state is None:
                first, first_state = i, state
            else:
                now = self._clock()
                return serving[first] if first_state.cost(now) <= state.cost(now) else serving[i]
        return None

    def _cheaper(self, a: Target, b: Target) -> Target:
        now = self._clock()
        get = self.endpoints.get
        return a if get(a.instance_id).cost(now) <= get(b.instance_id).cost(now) else b

    def _choose_among_all(
        self, call: OutboundCall, config: BreakerConfig | None, strategy: str
    ) -> Target:
        serving = [t for t in call.targets if t.record.status == "serving"]
        if not serving:
            states = sorted({t.record.status for t in call.targets})
            raise NoHealthyEndpoints(
                f"capability {call.capability!r}: all {len(call.targets)} instance(s) are "
                f"{' or '.join(states)}"
            )
        # A TrafficPolicy may set this capability's breaker thresholds and strategy.
        breaker = self.endpoints.breaker
        healthy = [t for t in serving if breaker(t.instance_id, config).available()]
        if not healthy:
            ends = [breaker(t.instance_id, config).ejected_until for t in serving]
            ends = [end for end in ends if end > 0]
            when = (
                f"the next probe is in {max(min(ends) - self._clock(), 0):.1f}s"
                if ends
                else "a probe is under way"
            )
            raise NoHealthyEndpoints(
                f"capability {call.capability!r}: all {len(serving)} instance(s) are ejected "
                f"by their circuit breakers; {when}"
            )
        if call.excluded:
            fresh = [t for t in healthy if t.instance_id not in call.excluded]
            healthy = fresh or healthy
        if self.zone is not None:
            local = [t for t in healthy if t.record.labels.get("zone") == self.zone]
            healthy = local or healthy
        if len(healthy) == 1:
            return healthy[0]
        if call.affinity_key is not None:
            return max(healthy, key=lambda t: _score(call.affinity_key or "", t.instance_id))
        if strategy == "round_robin":
            turn = self._turns.setdefault(call.capability, itertools.count())
            return healthy[next(turn) % len(healthy)]
        if strategy == "random":
            return self._rng.choice(healthy)
        a, b = self._rng.sample(healthy, 2)
        return self._cheaper(a, b)

    async def __call__(self, call: OutboundCall) -> Reply:
        target = call.target = self.choose(call)
        state = self.endpoints.get(target.instance_id)
        state.in_flight += 1
        state.calls += 1
        started = self._clock()
        try:
            reply = await self._inner(call)
        except BaseException:
            # Failures are not latency samples: a refused connection is fast, and must not make
            # a dead endpoint look attractive. The breaker deals with failing endpoints.
            state.in_flight -= 1
            state.failures += 1
            raise
        now = self._clock()
        state.observe(now - started, now)
        if reply.chunks is None:
            state.in_flight -= 1
        else:
            reply.chunks = _release_after(reply.chunks, state)
        return reply


def _score(key: str, instance_id: str) -> int:
    """Rendezvous (highest random weight) hash: stable across processes and restarts."""
    digest = hashlib.blake2b(f"{key}\x00{instance_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


async def _release_after(
    chunks: AsyncGenerator[bytes, None], state: EndpointState
) -> AsyncGenerator[bytes, None]:
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk
    finally:
        state.in_flight -= 1
