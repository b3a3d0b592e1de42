"""Retry: try another attempt when that is safe, within bounds, without storming.

What is safe to retry (never a call that may have run a non-idempotent capability):

- any capability: failures where the request provably never reached the agent, or was
  refused before running — connection refused (``ConnectionFailed``), draining
  (``AgentUnavailable``), rate limited (``RateLimited``, 429, honouring ``Retry-After``);
- idempotent capabilities (``@capability(idempotent=True)``) or calls with an
  ``idempotency_key``: also lost connections and per-try timeouts (``ConnectionLost``) and
  502/503/504 (``MeshUnavailable``);
- never: ``PolicyDenied``, ``InvalidInput``, other 4xx, ``RemoteAgentError`` (the capability
  ran and raised), ``DeadlineExceeded`` (the whole budget is spent).

Bounds: attempts, the call's total deadline (a backoff never sleeps past it), exponential
backoff with full jitter, a retry budget per capability (``budget.py``), and a per-try timeout
(``RetryPolicy.per_try_timeout``, else a share of the budget for idempotent calls) that this
layer chooses and ``deadline.AttemptTimeoutLayer`` enforces below the breaker, so an attempt
stuck on a frozen replica is given up in time to retry on another.

The loop is written out rather than run by tenacity. The first attempt is on every call's path,
where tenacity's machinery (a retry state, an async iterator and a context manager per attempt)
would cost more than the rest of this layer; and the rest — attempts, a backoff capped by the
deadline, a budget, moving off the endpoints that failed — is a dozen plain lines that read in
one pass, where tenacity for the retries alone left two halves to read instead of one.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

from agentmesh._config import RetryPolicy
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
from agentmesh.settings import Settings
from agentmesh.sidecar.budget import RetryBudget, RetryBudgetConfig
from agentmesh.sidecar.call import Handler, OutboundCall, Reply
from agentmesh.telemetry.metrics import OUTBOUND_RETRIES, RETRY_BUDGET_EXHAUSTED

__all__ = ["RetryLayer", "RetryPolicy", "default_policy", "retryable"]

#: Never reached the agent, or refused before running: safe for any capability.
_NEVER_RAN = (ConnectionFailed, AgentUnavailable, RateLimited)
#: May have run: safe only when running twice does no harm.
_MAY_HAVE_RAN = (ConnectionLost, MeshUnavailable)
#: Retrying cannot help, whatever the capability.
_FINAL = (DeadlineExceeded, NoHealthyEndpoints, RegistryUnavailable)


def default_policy(settings: Settings) -> RetryPolicy:
    """The sidecar's own retry policy, which a TrafficPolicy's retry settings override."""
    return RetryPolicy(attempts=settings.retry_attempts, per_try_share=settings.per_try_share)


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
        idempotent = call.idempotent or (bool(call.targets) and call.targets[0].spec.idempotent)
        call.per_try_timeout = _per_try(policy, call, idempotent)
        budget = self.budget(call.capability)
        budget.record_request()
        try:
            return await self._inner(call)
        except MeshError as exc:
            if policy.attempts < 2 or not retryable(exc, idempotent=idempotent):
                raise
            error = exc
        return await self._retry(call, policy, budget, error, idempotent)

    async def _retry(
        self,
        call: OutboundCall,
        policy: RetryPolicy,
        budget: RetryBudget,
        error: MeshError,
        idempotent: bool,
    ) -> Reply:
        """Attempts 2..n, each after a backoff, each on an endpoint that has not failed yet."""
        loop = asyncio.get_running_loop()
        while True:
            if (
                call.attempt >= policy.attempts
                or not retryable(error, idempotent=idempotent)
                or call.deadline <= loop.time()
            ):
                raise _with_attempts(error, call.attempt)
            if not budget.try_spend():
                RETRY_BUDGET_EXHAUSTED.labels(call.capability).inc()
                raise _with_attempts(error, call.attempt)
            self.retries += 1
            OUTBOUND_RETRIES.labels(call.capability).inc()
            await asyncio.sleep(_backoff(call, policy, error, loop.time()))
            if call.deadline <= loop.time():
                raise _with_attempts(error, call.attempt)
            if call.target is not None:
                call.excluded = (*call.excluded, call.target.instance_id)
            call.target = None
            call.attempt += 1
            try:
                return await self._inner(call)
            except MeshError as exc:
                error = exc


def _per_try(policy: RetryPolicy, call: OutboundCall, idempotent: bool) -> float | None:
    """The bound on each attempt of this call: the policy's, else for a call that may be
    retried after a timeout, its share of the budget; else none (only the deadline)."""
    if policy.per_try_timeout is not None:
        return policy.per_try_timeout
    if idempotent and policy.attempts > 1 and policy.per_try_share < 1 and call.timeout:
        return call.timeout * policy.per_try_share
    return None


def _backoff(call: OutboundCall, policy: RetryPolicy, last: MeshError, now: float) -> float:
    """Full-jitter exponential backoff before the next attempt, never past the deadline.

    Zero when the request never reached a dead endpoint and another one is there: moving on at
    once costs the callee nothing and saves the caller the backoff.
    """
    if isinstance(last, ConnectionFailed) and _others_left(call):
        return 0.0
    cap = min(policy.max_backoff, policy.backoff * 2 ** (call.attempt - 1))
    delay = random.uniform(0, cap)
    if last.retry_after is not None:
        delay = max(delay, last.retry_after)
    return max(0.0, min(delay, call.deadline - now))


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
