"""Deadlines: where a call's time budget is computed, and where it is enforced.

- ``DeadlineLayer`` (above retry) fixes the call's budget once: the caller's ``timeout=``, else
  its TrafficPolicy's, else the capability's own ``timeout``, else ``AGENTMESH_CALL_TIMEOUT``;
  never past the deadline of the inbound call being served (``current_deadline``), so a chain
  A→B→C never outlives its caller. Every backoff and attempt below spends that one budget.
- ``AttemptTimeoutLayer`` (just above the transport, below the breaker) bounds one attempt on
  one endpoint by the call's deadline and the retry layer's per-try timeout, and turns the timer
  into that endpoint's error: ``ConnectionLost`` when the per-try bound passed (it may have run:
  an idempotent call retries elsewhere), ``DeadlineExceeded`` when the whole budget did. Being
  below the breaker, the breaker sees a timeout as the endpoint's failure — a half-open probe
  that times out re-opens it — never as a silent cancellation.
- A stream's chunks arrive under the call's deadline and its first-chunk and between-chunks
  timeouts (``chunk_deadline``, read by the transport).
- The remaining budget travels downstream as ``agentmesh-timeout-ms`` (``header_ms`` /
  ``from_header``); the receiving side bounds it further by the capability's own timeout
  (``bound``) and cancels the work when it passes.

The agent is told the call's whole remaining budget, not the attempt's: an agent told to stop
at the per-try bound would race the caller's timer with a ``DeadlineExceeded`` of its own, which
is final, where the caller's per-try timeout would have retried.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

from agentmesh.errors import ConnectionLost, DeadlineExceeded, InvalidInput, MeshError
from agentmesh.sidecar.call import Handler, OutboundCall, Reply

__all__ = [
    "DEADLINE_HEADER",
    "AttemptTimeoutLayer",
    "DeadlineLayer",
    "bound",
    "chunk_deadline",
    "current_deadline",
    "from_header",
    "header_ms",
]

#: Milliseconds left in the caller's budget when the request left the sidecar.
DEADLINE_HEADER = "agentmesh-timeout-ms"

#: The deadline of the inbound call being served, so that calls made from inside a capability
#: inherit what is left of their caller's budget: a chain can never outlive its caller.
current_deadline: ContextVar[float | None] = ContextVar("agentmesh_deadline", default=None)


def bound(now: float, timeout: float | None, inherited: float | None) -> float | None:
    """``now + timeout``, but never past ``inherited``; None when neither bounds anything."""
    if timeout is None:
        return inherited
    deadline = now + timeout
    return deadline if inherited is None or deadline < inherited else inherited


def header_ms(deadline: float, now: float) -> int:
    """The ``agentmesh-timeout-ms`` value for ``deadline``: at least 1, as 0 would mean none."""
    ms = int((deadline - now) * 1000)
    return ms if ms > 1 else 1


def from_header(value: bytes, now: float) -> float:
    """The deadline an ``agentmesh-timeout-ms`` value gives, on the clock ``now`` is read from."""
    try:
        ms = int(value)
    except ValueError:
        raise InvalidInput(f"header {DEADLINE_HEADER} must be an integer") from None
    return now + max(ms, 0) / 1000


def chunk_deadline(call: OutboundCall, chunks: int, now: float) -> tuple[float, float | None]:
    """When a stream's next chunk must have arrived, and the chunk timeout if that is the bound.

    The call's deadline, or sooner ``first_chunk_timeout`` (before the first) or
    ``chunk_timeout`` (between two), counted from ``now``.
    """
    gap = call.chunk_timeout if chunks else call.first_chunk_timeout
    if gap is not None and now + gap < call.deadline:
        return now + gap, gap
    return call.deadline, None


class DeadlineLayer:
    """Fix the call's deadline and budget (``call.deadline``, ``call.timeout``) once."""

    def __init__(self, inner: Handler, *, default_timeout: float) -> None:
        self._inner = inner
        self.default_timeout = default_timeout

    async def __call__(self, call: OutboundCall) -> Reply:
        timeout = call.timeout
        if timeout is None:
            route = call.traffic
            if route is not None and route.timeout is not None:
                timeout = route.timeout
            else:
                spec = call.targets[0].spec.timeout if call.targets else None
                timeout = spec or self.default_timeout
        # bound(), written out: this runs on every call.
        now = asyncio.get_running_loop().time()
        deadline = now + timeout
        inherited = current_deadline.get()
        if inherited is not None and inherited < deadline:
            if inherited <= now:
                raise DeadlineExceeded(
                    f"capability {call.capability!r}: the caller's own deadline has passed; "
                    "not sent"
                )
            deadline = inherited
            timeout = inherited - now
        call.deadline = deadline
        call.timeout = timeout
        return await self._inner(call)


class AttemptTimeoutLayer:
    """Bound one attempt; a timer that fires is the endpoint's error (see the module docstring).

    A streamed attempt is bounded until the agent answers; its chunks then flow under the
    call's deadline and chunk timeouts (``transport.py``), since a stream is never retried once
    it flows.
    """

    def __init__(self, inner: Handler) -> None:
        self._inner = inner

    async def __call__(self, call: OutboundCall) -> Reply:
        limit = call.deadline
        per_try = call.per_try_timeout
        if per_try is not None and (end := asyncio.get_running_loop().time() + per_try) < limit:
            limit = end
        try:
            async with asyncio.timeout_at(limit) as scope:
                return await self._inner(call)
        except TimeoutError as exc:
            if not scope.expired():
                raise
            raise _timed_out(call, per_try if limit < call.deadline else None) from exc


def _timed_out(call: OutboundCall, per_try: float | None) -> MeshError:
    target = call.target
    assert target is not None, "the balance layer sets call.target"
    if per_try is not None:
        return ConnectionLost(
            f"agent {target.instance_id} at {target.url}: attempt {call.attempt} got no reply "
            f"within its per-try timeout of {per_try:g}s; it may still have run"
        )
    return DeadlineExceeded(
        f"capability {call.capability!r} at {target.url}: no reply within {call.timeout:g}s"
    )
