"""Retry: try another attempt when that is safe, within bounds, without storming.

What is safe to retry (never a call that may have run a non-idempotent capability):

- any capability: failures where the request provably never reached the agent, or was
  refused before running — connection refused (``ConnectionFailed``), draining
  (``AgentUnavailable``), rate limited (``RateLimited``, 429, honouring ``Retry-After``);
- idempotent capabilities (``@capability(idempotent=True)``) or calls with an
  ``idempotency_key``: also lost connections and attempt timeouts (``ConnectionLost``) and
  502/503/504 (``MeshUnavailable``);
- never: ``PolicyDenied``, ``InvalidInput``, other 4xx, ``RemoteAgentError`` (the capability
  ran and raised), ``DeadlineExceeded`` (the whole budget is spent).

Bounds: attempts, the call's total deadline (a backoff never sleeps past it), exponential
backoff with full jitter, and a retry budget per capability (``budget.py``).

The first attempt runs without tenacity: it costs ~25 µs per call (DESIGN §7) and almost every
call succeeds the first time. Only a failed first attempt enters tenacity's loop, and only then
is tenacity imported (~5 ms less on every agent's start-up).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, replace

from agentmesh.errors import (
    AgentUnavailable,
    ConnectionFailed,
    ConnectionLost,
    DeadlineExceeded,
    MeshError,
    MeshUnavailable,
    NoHealthyEndpoints,
    RateLimited,
    RegistryUnavailable,
)
from agentmesh.sidecar.budget import RetryBudget, RetryBudgetConfig
from agentmesh.sidecar.call import Handler, OutboundCall, Reply
from agentmesh.telemetry.metrics import OUTBOUND_RETRIES, RETRY_BUDGET_EXHAUSTED

__all__ = ["RetryLayer", "RetryPolicy", "retryable"]

#: Never reached the agent, or refused before running: safe for any capability.
_NEVER_RAN = (ConnectionFailed, AgentUnavailable, RateLimited)
#: May have run: safe only when running twice does no harm.
_MAY_HAVE_RAN = (ConnectionLost, MeshUnavailable)
#: Retrying cannot help, whatever the capability.
_FINAL = (DeadlineExceeded, NoHealthyEndpoints, RegistryUnavailable)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one call may be retried; ``Mesh.call(retries=...)`` overrides ``attempts``."""

    attempts: int = 3
    """Total attempts including the first (Linkerd/Envoy default to a few; 3 bounds the tail)."""
    backoff: float = 0.025
    """First backoff in seconds; doubles per retry, with full jitter."""
    max_backoff: float = 0.25
    """Ceiling of one backoff: retries are for transient failures, not outages."""
    attempt_timeout: float | None = None
    """Bound on one attempt (idempotent calls retry when it passes); None: only the deadline."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < self.backoff:
            raise ValueError("backoff must be >= 0 and max_backoff >= backoff")
        if self.attempt_timeout is not None and self.attempt_timeout <= 0:
            raise ValueError(f"attempt_timeout must be > 0, got {self.attempt_timeout}")


def retryable(exc: BaseException, *, idempotent: bool) -> bool:
    """May a call that failed with ``exc`` be sent again?"""
    if not isinstance(exc, MeshError) or isinstance(exc, _FINAL):
        return False
    if isinstance(exc, _NEVER_RAN):
        return True
    return idempotent and isinstance(exc, _MAY_HAVE_RAN)


class RetryLayer:
    def __init__(
        self,
        inner: Handler,
        *,
        policy: RetryPolicy | None = None,
        budget: RetryBudgetConfig | None = None,
    ) -> None:
        self._inner = inner
        self.policy = policy or RetryPolicy()
        self._budget_config = budget or RetryBudgetConfig()
        self.budgets: dict[str, RetryBudget] = {}
        self.retries = 0

    def budget(self, capability: str) -> RetryBudget:
        budget = self.budgets.get(capability)
        if budget is None:
            budget = self.budgets[capability] = RetryBudget(self._budget_config)
        return budget

    async def __call__(self, call: OutboundCall) -> Reply:
        # A TrafficPolicy's retry settings (set on the call by the route layer) replace ours;
        # an explicit ``retries=`` of the caller still wins over both.
        base = self.policy if call.traffic is None else (call.traffic.retry or self.policy)
        policy = base if call.retries is None else replace(base, attempts=call.retries + 1)
        budget = self.budget(call.capability)
        budget.record_request()
        try:
            return await self._attempt(call, policy)
        except MeshError as exc:
            idempotent = call.idempotent or any(t.spec.idempotent for t in call.targets[:1])
            if policy.attempts < 2 or not retryable(exc, idempotent=idempotent):
                raise
            first = exc
        return await self._retry(call, policy, budget, first, idempotent)

    async def _attempt(self, call: OutboundCall, policy: RetryPolicy) -> Reply:
        if policy.attempt_timeout is None:
            return await self._inner(call)
        loop = asyncio.get_running_loop()
        limit = min(call.deadline, loop.time() + policy.attempt_timeout)
        if limit >= call.deadline:
            return await self._inner(call)
        try:
            async with asyncio.timeout_at(limit):
                return await self._inner(call)
        except TimeoutError as exc:
            where = call.target.url if call.target is not None else call.capability
            raise ConnectionLost(
                f"capability {call.capability!r} at {where}: attempt {call.attempt} timed out "
                f"after {policy.attempt_timeout:g}s; it may still have run"
            ) from exc

    async def _retry(
        self,
        call: OutboundCall,
        policy: RetryPolicy,
        budget: RetryBudget,
        first: MeshError,
        idempotent: bool,
    ) -> Reply:
        loop = asyncio.get_running_loop()
        last = first

        def backoff(retry: int) -> float:
            """Full-jitter exponential backoff before retry number ``retry`` (1-based).

            Zero when the request never reached a dead endpoint and another one is there:
            moving on at once costs the callee nothing and saves the caller the backoff.
            """
            if isinstance(last, ConnectionFailed) and _others_left(call):
                return 0.0
            cap = min(policy.max_backoff, policy.backoff * 2 ** (retry - 1))
            delay = random.uniform(0, cap)
            if last.retry_after is not None:
                delay = max(delay, last.retry_after)
            return max(0.0, min(delay, call.deadline - loop.time()))

        def should_retry(exc: BaseException) -> bool:
            if not retryable(exc, idempotent=idempotent) or call.deadline <= loop.time():
                return False
            if not budget.try_spend():
                RETRY_BUDGET_EXHAUSTED.labels(call.capability).inc()
                return False
            self.retries += 1
            OUTBOUND_RETRIES.labels(call.capability).inc()
            return True

        if not should_retry(first):
            raise _with_attempts(first, call.attempt)
        await asyncio.sleep(backoff(1))
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts - 1),
            wait=lambda state: backoff(state.attempt_number + 1),
            retry=retry_if_exception(should_retry),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if call.target is not None:
                        call.excluded = (*call.excluded, call.target.instance_id)
                    call.target = None
                    call.attempt += 1
                    try:
                        return await self._attempt(call, policy)
                    except MeshError as exc:
                        last = exc
                        raise
        except MeshError as exc:
            raise _with_attempts(exc, call.attempt) from None
        raise AssertionError("tenacity returns or re-raises")


def _others_left(call: OutboundCall) -> bool:
    """Whether an instance that has not failed this call yet is among its targets."""
    tried = set(call.excluded)
    if call.target is not None:
        tried.add(call.target.instance_id)
    return any(t.instance_id not in tried for t in call.targets)


def _with_attempts(exc: MeshError, attempts: int) -> MeshError:
    """Say in the message how many attempts were made, so nobody wonders whether we retried."""
    if attempts > 1:
        exc.message = f"{exc.message} (after {attempts} attempts)"
        exc.args = (exc.message,)
    return exc
