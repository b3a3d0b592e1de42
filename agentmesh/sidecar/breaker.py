"""Breaker: the per-endpoint circuit breaker state machine (outlier ejection).

One ``Breaker`` per endpoint, so one bad replica is ejected alone. It is a pure,
synchronous state machine driven from one event loop: no threads, no I/O, and every
time-based decision reads the injected clock, evaluated lazily when the state is next looked
at. The usual Python libraries (pybreaker, circuitbreaker, aiobreaker) guard one function for
the whole process: none limits the in-flight half-open probes of an asyncio caller, times out
a probe that never answers (so the breaker could stick half-open), or ejects per endpoint with
a growing, jittered backoff and a cap on the share ejected. Hence this module.

States::

    closed --(consecutive failures | failure rate)--> open --(ejection ends)--> half_open
    half_open --(probe ok)--> closed
    half_open --(probe failed | probe timed out)--> open, for twice as long (capped)

Defaults (``BreakerConfig``) and why:

- ``consecutive_failures=5``: Envoy's consecutive-5xx default (Linkerd uses 7). Agent calls
  are slow and costly, so we eject a dead replica at the lower anchor.
- ``failure_rate=0.5``, ``min_requests=20``, ``window=10.0``: Hystrix's defaults. They catch a
  replica that fails every other call and so never fails five in a row; below 20 requests in
  the window a few failures say too little to eject on. The window slides in steps of a tenth
  of its length, so an outcome counts for between 0.9 and 1.0 ``window``.
- ``base_ejection=1.0``: Linkerd's minimum penalty. A replica that blipped (restart, GC pause)
  comes back quickly; one that keeps failing is kept out longer by the backoff.
- ``max_ejection=30.0``: Envoy's base ejection time, as the longest a replica stays out, so a
  recovered replica gets traffic again within half a minute. It is a hard ceiling: jitter
  never takes an ejection past it.
- ``jitter=0.2``: many sidecars eject the same replica at about the same moment; jitter
  spreads their probes instead of letting them all land at once.
- ``half_open_probes=1``: risk one request at a time on a replica that just failed (Linkerd
  sends a single probe).
- ``probe_timeout=5.0``: a probe that never reports counts as failed, so the breaker cannot
  stick half-open. It must exceed the normal latency of the endpoint's calls, or a healthy
  but slow replica never closes.

Decisions:

- Only a failure can trip the breaker: the failure rate is checked when a failure is
  recorded, never on a success.
- Tripping clears the consecutive count and the window, so a replica that closes again
  starts with a clean slate instead of re-tripping on the failures that ejected it.
- ``ejections`` (which drives the backoff) survives a close: a replica that flaps
  (closes, then trips again soon) is kept out longer each time. It decays to 0 only after
  ``max_ejection`` seconds closed without tripping.
- ``record()`` cannot tell which request it reports, so outcomes are matched by count: while
  open every outcome is ignored (the ejection is already decided; it is the late outcome of a
  timed-out probe or of a request admitted before the trip), and while half-open an outcome
  settles the oldest outstanding probe, or is ignored when none is outstanding. A late outcome
  that lands on a newer probe is still a fresh answer from the same endpoint, so acting on it
  is sound; the newer probe's own outcome then finds no probe and is ignored.
- ``may_eject=False`` (the caller's cap on the share of ejected endpoints is reached) also
  holds for a failed probe: the breaker stays half-open and frees the probe's slot. A probe
  timeout re-opens regardless, since there is no caller to ask.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

from agentmesh._config import BreakerConfig
from agentmesh.errors import ConnectionFailed, ConnectionLost, DeadlineExceeded, MeshUnavailable
from agentmesh.sidecar.call import Handler, OutboundCall, Reply

if TYPE_CHECKING:
    from agentmesh.sidecar.endpoints import Endpoints

__all__ = [
    "Breaker",
    "BreakerConfig",
    "BreakerLayer",
    "BreakerState",
    "ejected_ratio",
    "endpoint_failed",
]

BreakerState = Literal["closed", "open", "half_open"]

#: The failure-rate window is kept as this many buckets of ``window / _BUCKETS`` seconds.
_BUCKETS = 10

#: The jitter source of breakers not given one. Shared: seeding a generator per endpoint costs
#: time and memory for each, and every endpoint of the index gets a breaker up front.
_RNG = random.Random()
_DEFAULT = BreakerConfig()


class Breaker:
    """The breaker of one endpoint. See the module docstring for the rules."""

    __slots__ = (
        "_bucket_width",
        "_buckets",
        "_clock",
        "_closed_since",
        "_config",
        "_consecutive",
        "_ejected_until",
        "_ejections",
        "_failures",
        "_max_doublings",
        "_on_change",
        "_probes",
        "_rng",
        "_state",
        "_total",
    )

    def __init__(
        self,
        config: BreakerConfig = _DEFAULT,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._rng = rng or _RNG
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._consecutive = 0
        # Failure-rate window: [bucket index, requests, failures], oldest first, and the sums.
        # Lists, not deques: at most _BUCKETS (and half_open_probes) entries, and an empty deque
        # takes 760 bytes, which adds up over 10,000 endpoints.
        self._bucket_width = config.window / _BUCKETS
        self._buckets: list[list[int]] = []
        self._total = 0
        self._failures = 0
        self._ejections = 0
        # Doublings that take the backoff to max_ejection (ratio < 2**e), so 2**n cannot overflow.
        _, self._max_doublings = math.frexp(config.max_ejection / config.base_ejection)
        self._ejected_until = 0.0
        self._closed_since = clock()
        # Deadlines of the outstanding half-open probes, oldest first.
        self._probes: list[float] = []

    @property
    def state(self) -> BreakerState:
        if self._state != "closed":
            self._catch_up(self._clock())
        return self._state

    @property
    def ejected_until(self) -> float:
        """Clock time the current ejection ends; 0.0 unless open."""
        if self._state != "closed":
            self._catch_up(self._clock())
        return self._ejected_until

    @property
    def ejections(self) -> int:
        """Consecutive ejections: the next one lasts base × 2^ejections (capped, jittered).

        Kept across a close, so a flapping endpoint backs off further; back to 0 after
        ``max_ejection`` seconds closed without tripping.
        """
        now = self._clock()
        self._catch_up(now)
        self._decay(now)
        return self._ejections

    def available(self) -> bool:
        """May the balancer pick this endpoint now? Reserves nothing."""
        if self._state == "closed":
            return True
        self._catch_up(self._clock())
        return self._state == "half_open" and len(self._probes) < self._config.half_open_probes

    def try_acquire(self) -> bool:
        """Reserve the right to send one request now; report its outcome with ``record``."""
        if self._state == "closed":
            return True
        now = self._clock()
        self._catch_up(now)
        if self._state == "half_open" and len(self._probes) < self._config.half_open_probes:
            self._probes.append(now + self._config.probe_timeout)
            return True
        return False

    def record(self, ok: bool, *, may_eject: bool = True) -> None:
        """The outcome of one request that ``try_acquire`` allowed.

        ``may_eject=False`` says the caller's cap on the share of ejected endpoints is reached:
        a failure is counted but does not open the breaker.
        """
        now = self._clock()
        if self._state == "closed":
            self._record_closed(now, ok, may_eject)
            return
        self._catch_up(now)
        if self._state == "open" or not self._probes:
            return  # a late outcome: see the module docstring
        del self._probes[0]
        if ok:
            self._close(now)
        elif may_eject:
            self._open(now, self._next_ejection(now))

    def release(self) -> None:
        """An admitted request ended without an outcome (its caller gave up, not the endpoint).

        Half-open, it frees the oldest probe's slot without judging the endpoint, so the next
        call probes at once instead of waiting for the probe timeout; closed, it counts nothing.
        """
        if self._state == "closed":
            return
        self._catch_up(self._clock())
        if self._state == "half_open" and self._probes:
            del self._probes[0]

    def force_open(self, seconds: float | None = None) -> None:
        """Eject now: for ``seconds`` exactly (``math.inf``: until ``reset``), or by backoff.

        An explicit duration does not count towards the backoff; ``None`` counts as one more
        ejection. An ejection already under way is never shortened.
        """
        if seconds is not None and not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds!r}")
        now = self._clock()
        self._catch_up(now)
        self._open(now, self._next_ejection(now) if seconds is None else seconds)

    def reset(self) -> None:
        """Back to closed with every count cleared, the backoff included."""
        self._ejections = 0
        self._close(self._clock())

    def _record_closed(self, now: float, ok: bool, may_eject: bool) -> None:
        config = self._config
        if config.failure_rate is not None:
            self._count(now, ok)
        if ok:
            self._consecutive = 0
            return
        self._consecutive += 1
        if may_eject and (
            self._consecutive >= config.consecutive_failures
            or (
                config.failure_rate is not None
                and self._total >= config.min_requests
                and self._failures / self._total >= config.failure_rate
            )
        ):
            self._open(now, self._next_ejection(now))

    def _count(self, now: float, ok: bool) -> None:
        """Add one outcome to the window, after dropping the buckets that left it."""
        index = int(now // self._bucket_width)
        buckets = self._buckets
        while buckets and buckets[0][0] <= index - _BUCKETS:
            _, total, failures = buckets.pop(0)
            self._total -= total
            self._failures -= failures
        if not buckets or buckets[-1][0] < index:
            buckets.append([index, 0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        self._total += 1
        if not ok:
            bucket[2] += 1
            self._failures += 1

    def _catch_up(self, now: float) -> None:
        """Apply the time-based transitions due by ``now``, at the times they were due."""
        if self._state == "half_open" and self._probes and now >= self._probes[0]:
            # The oldest probe never reported: it failed, at its deadline.
            deadline = self._probes[0]
            self._open(deadline, self._next_ejection(deadline))
        if self._state == "open" and now >= self._ejected_until:
            self._ejected_until = 0.0
            self._transition("half_open")

    def _decay(self, now: float) -> None:
        if self._state == "closed" and now - self._closed_since >= self._config.max_ejection:
            self._ejections = 0

    def _next_ejection(self, now: float) -> float:
        """The length of the next ejection: base × 2^ejections, capped, jittered; counts it."""
        config = self._config
        self._decay(now)
        doublings = min(self._ejections, self._max_doublings)
        backoff = min(math.ldexp(config.base_ejection, doublings), config.max_ejection)
        self._ejections += 1
        jitter = self._rng.uniform(1 - config.jitter, 1 + config.jitter)
        return min(backoff * jitter, config.max_ejection)

    def _open(self, now: float, seconds: float) -> None:
        until = now + seconds
        if self._state == "open":
            until = max(until, self._ejected_until)
        self._ejected_until = until
        self._consecutive = 0
        self._clear_window()
        self._probes.clear()
        self._transition("open")

    def _close(self, now: float) -> None:
        self._ejected_until = 0.0
        self._closed_since = now
        self._consecutive = 0
        self._clear_window()
        self._probes.clear()
        self._transition("closed")

    def _clear_window(self) -> None:
        self._buckets.clear()
        self._total = 0
        self._failures = 0

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        if old == new:
            return
        self._state = new
        if self._on_change is not None:
            self._on_change(old, new)


def ejected_ratio(breakers: Iterable[Breaker]) -> float:
    """The share of these endpoints currently ejected (open); 0.0 for none."""
    states = [breaker.state for breaker in breakers]
    return states.count("open") / len(states) if states else 0.0


#: Failures that say something about the endpoint itself: it could not be reached, the
#: connection broke, a gateway error, or no reply in time (our attempt's timer fired, or the
#: agent gave up at the deadline we sent it: either way the endpoint did not answer in time, and
#: a frozen replica must be ejected like a dead one). A capability that raised, a policy denial,
#: bad input, a draining or rate-limited agent: the endpoint is healthy, so they count as
#: successes of the endpoint.
def endpoint_failed(exc: BaseException) -> bool:
    return (
        isinstance(exc, ConnectionFailed | ConnectionLost | DeadlineExceeded)
        or type(exc) is MeshUnavailable
    )


class BreakerLayer:
    """Admit an attempt only if its endpoint's breaker allows it; feed the outcome back.

    Sits below balance (which already skips ejected endpoints), so a refusal here only happens
    when another call took the last half-open probe slot meanwhile; it is a ``ConnectionFailed``
    (the request never left), which the retry layer may send elsewhere. Sits above the attempt
    timeout (``deadline.AttemptTimeoutLayer``), so an attempt that ran out of time arrives here as
    the endpoint's failure, never as a cancellation; a cancellation that does arrive is the
    caller giving up, which says nothing about the endpoint (``Breaker.release``).
    """

    def __init__(
        self, inner: Handler, endpoints: Endpoints, *, max_ejected_ratio: float = 0.5
    ) -> None:
        self._inner = inner
        self._endpoints = endpoints
        self.max_ejected_ratio = max_ejected_ratio

    async def __call__(self, call: OutboundCall) -> Reply:
        target = call.target
        assert target is not None, "the balance layer sets call.target"
        config = call.traffic.breaker if call.traffic is not None else None
        breaker = self._endpoints.breaker(target.instance_id, config)
        if not breaker.try_acquire():
            raise ConnectionFailed(
                f"agent {target.instance_id} at {target.url}: ejected by its circuit breaker"
            )
        try:
            reply = await self._inner(call)
        except Exception as exc:
            failed = endpoint_failed(exc)
            breaker.record(
                not failed, may_eject=failed and self._endpoints.may_eject(self.max_ejected_ratio)
            )
            raise
        except BaseException:  # cancelled (asyncio.CancelledError) or the process is stopping
            breaker.release()
            raise
        breaker.record(True)
        return reply
