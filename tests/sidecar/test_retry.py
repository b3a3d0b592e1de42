"""The retry layer and its budget, driven by a scripted next layer (unit level, no network)."""

from __future__ import annotations

import asyncio

import pytest
from packaging.version import Version

from agentmesh import (
    AgentRecord,
    AgentUnavailable,
    CapabilitySpec,
    ConnectionFailed,
    ConnectionLost,
    DeadlineExceeded,
    InvalidInput,
    MeshUnavailable,
    PolicyDenied,
    RateLimited,
    RemoteAgentError,
)
from agentmesh._config import RetryPolicy
from agentmesh.errors import MeshError
from agentmesh.registry.index import Target
from agentmesh.sidecar.budget import RetryBudget, RetryBudgetConfig
from agentmesh.sidecar.call import OutboundCall, Reply
from agentmesh.sidecar.deadline import AttemptTimeoutLayer
from agentmesh.sidecar.retry import RetryLayer, retryable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def target(idempotent: bool) -> Target:
    spec = CapabilitySpec(name="cap", input_schema={}, output_schema={}, idempotent=idempotent)
    record = AgentRecord(
        instance_id="a-1", name="a", endpoint="http://127.0.0.1:1", capabilities=(spec,)
    )
    return Target(record, spec, Version("0.1.0"))


class Script:
    """A next layer that fails with the given errors, in order, then succeeds."""

    def __init__(self, *errors: MeshError, t: Target) -> None:
        self.errors = list(errors)
        self.attempts = 0
        self.t = t

    async def __call__(self, call: OutboundCall) -> Reply:
        self.attempts += 1
        call.target = self.t
        if self.errors:
            raise self.errors.pop(0)
        return Reply(self.t, body=b"1")


def make_call(*, idempotent: bool, timeout: float = 5.0, **fields: object) -> OutboundCall:
    loop = asyncio.get_running_loop()
    call = OutboundCall("cap", b"{}", deadline=loop.time() + timeout, timeout=timeout, **fields)  # type: ignore[arg-type]
    call.targets = (target(idempotent),)
    return call


FAST = RetryPolicy(attempts=3, backoff=0.001, max_backoff=0.002)


@pytest.mark.parametrize(
    ("error", "idempotent", "expected"),
    [
        (ConnectionFailed("refused"), False, True),
        (AgentUnavailable("draining"), False, True),
        (RateLimited("slow down"), False, True),
        (ConnectionLost("reset"), False, False),
        (ConnectionLost("reset"), True, True),
        (MeshUnavailable("502"), False, False),
        (MeshUnavailable("502"), True, True),
        (PolicyDenied("no"), True, False),
        (InvalidInput("bad"), True, False),
        (RemoteAgentError("raised"), True, False),
        (DeadlineExceeded("late"), True, False),
    ],
)
def test_what_is_retryable(error: MeshError, idempotent: bool, expected: bool):
    assert retryable(error, idempotent=idempotent) is expected


async def test_a_call_that_never_reached_the_agent_is_retried_even_if_not_idempotent():
    inner = Script(ConnectionFailed("refused"), t=target(False))
    layer = RetryLayer(inner, policy=FAST)
    call = make_call(idempotent=False)
    assert (await layer(call)).body == b"1"
    assert inner.attempts == 2
    assert call.attempt == 2
    assert call.excluded == ("a-1",)  # the retry avoids the instance that failed


async def test_a_non_idempotent_call_that_may_have_run_is_not_retried():
    inner = Script(ConnectionLost("reset after send"), t=target(False))
    with pytest.raises(ConnectionLost, match="reset after send"):
        await RetryLayer(inner, policy=FAST)(make_call(idempotent=False))
    assert inner.attempts == 1


async def test_an_idempotency_key_makes_it_retryable():
    inner = Script(ConnectionLost("reset"), t=target(False))
    call = make_call(idempotent=False)
    call.idempotent = True  # what Mesh.call(idempotency_key=...) sets
    await RetryLayer(inner, policy=FAST)(call)
    assert inner.attempts == 2


async def test_attempts_are_bounded_and_the_message_says_how_many():
    inner = Script(*[MeshUnavailable("502")] * 5, t=target(True))
    with pytest.raises(MeshUnavailable, match=r"502 \(after 3 attempts\)"):
        await RetryLayer(inner, policy=FAST)(make_call(idempotent=True))
    assert inner.attempts == 3


async def test_per_call_override_disables_retries():
    inner = Script(ConnectionFailed("refused"), t=target(True))
    with pytest.raises(ConnectionFailed):
        await RetryLayer(inner, policy=FAST)(make_call(idempotent=True, retries=0))
    assert inner.attempts == 1


async def test_retry_after_is_honoured():
    inner = Script(RateLimited("busy", retry_after=0.2), t=target(False))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await RetryLayer(inner, policy=FAST)(make_call(idempotent=False))
    assert loop.time() - started >= 0.19


async def test_backoff_never_sleeps_past_the_deadline():
    inner = Script(RateLimited("busy", retry_after=30), RateLimited("busy"), t=target(False))
    loop = asyncio.get_running_loop()
    started = loop.time()
    call = make_call(idempotent=False, timeout=0.2)
    with pytest.raises(RateLimited):
        await RetryLayer(inner, policy=FAST)(call)
    assert loop.time() - started < 1.0


async def test_a_per_try_timeout_makes_idempotent_calls_try_again():
    calls = 0

    async def slow_then_fast(call: OutboundCall) -> Reply:
        nonlocal calls
        calls += 1
        call.target = target(True)
        if calls == 1:
            await asyncio.sleep(10)
        return Reply(call.target, body=b"2")

    policy = RetryPolicy(attempts=2, backoff=0.001, max_backoff=0.001, per_try_timeout=0.05)
    layer = RetryLayer(AttemptTimeoutLayer(slow_then_fast), policy=policy)
    assert (await layer(make_call(idempotent=True))).body == b"2"
    assert calls == 2


@pytest.mark.parametrize(
    ("policy", "idempotent", "expected"),
    [
        (RetryPolicy(), True, 5.0),  # half of the 10 s budget: a retry gets the other half
        (RetryPolicy(), False, None),  # it could not be retried after a timeout: no bound
        (RetryPolicy(attempts=1), True, None),  # no retry to leave time for
        (RetryPolicy(per_try_share=1.0), True, None),
        (RetryPolicy(per_try_share=0.25), True, 2.5),
        (RetryPolicy(per_try_timeout=2.0), False, 2.0),  # an explicit bound applies to all
    ],
)
async def test_the_per_try_timeout_the_retry_layer_picks(
    policy: RetryPolicy, idempotent: bool, expected: float | None
):
    seen: list[float | None] = []

    async def record(call: OutboundCall) -> Reply:
        seen.append(call.per_try_timeout)
        return Reply(target(idempotent), body=b"1")

    await RetryLayer(record, policy=policy)(make_call(idempotent=idempotent, timeout=10.0))
    assert seen == [expected]


async def test_a_per_try_timeout_of_a_non_idempotent_call_is_final():
    async def frozen(call: OutboundCall) -> Reply:
        call.target = target(False)
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    policy = RetryPolicy(backoff=0.001, max_backoff=0.001, per_try_timeout=0.05)
    with pytest.raises(ConnectionLost, match=r"per-try timeout of 0\.05s; it may still have run"):
        await RetryLayer(AttemptTimeoutLayer(frozen), policy=policy)(make_call(idempotent=False))


async def test_the_last_attempt_that_runs_out_of_budget_is_a_deadline_error():
    attempts = 0

    async def frozen(call: OutboundCall) -> Reply:
        nonlocal attempts
        attempts += 1
        call.target = target(True)
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    # Per try: half of 0.2 s. The first attempt is given up after 0.1 s, the second runs into
    # the call's deadline: that one is final, and says how many attempts there were.
    layer = RetryLayer(AttemptTimeoutLayer(frozen), policy=FAST)
    with pytest.raises(DeadlineExceeded, match=r"no reply within 0\.2s \(after 2 attempts\)"):
        await layer(make_call(idempotent=True, timeout=0.2))
    assert attempts == 2


def test_budget_allows_the_floor_then_a_share_of_traffic():
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetConfig(ratio=0.2, min_per_second=1, window=10), clock=clock)
    # No traffic: the floor alone allows 1/s over 10 s = 10 retries.
    assert sum(budget.try_spend() for _ in range(20)) == 10
    for _ in range(100):
        budget.record_request()
    # 100 requests add 20% = 20 more.
    assert sum(budget.try_spend() for _ in range(50)) == 20
    assert budget.refused == 40


def test_budget_forgets_traffic_older_than_its_window():
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetConfig(ratio=0.5, min_per_second=0, window=2), clock=clock)
    for _ in range(10):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(10)) == 5
    clock.now += 2
    assert not budget.try_spend()  # the 10 requests left the window, and so did the retries
    budget.record_request()
    budget.record_request()
    assert budget.try_spend()


async def test_the_budget_stops_retry_storms():
    budget = RetryBudgetConfig(ratio=0.2, min_per_second=0.5, window=10)
    inner = Script(*[ConnectionFailed("down")] * 10_000, t=target(True))
    layer = RetryLayer(inner, policy=FAST, budget=budget)
    for _ in range(200):
        with pytest.raises(ConnectionFailed):
            await layer(make_call(idempotent=True))
    # 200 calls may add at most 20% + 5 retries (plus the attempts of calls themselves).
    assert inner.attempts - 200 <= 0.2 * 200 + 5
    assert layer.budget("cap").refused > 0


def test_policy_validation():
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="per_try_timeout"):
        RetryPolicy(per_try_timeout=0)
    with pytest.raises(ValueError, match="per_try_share"):
        RetryPolicy(per_try_share=0)
