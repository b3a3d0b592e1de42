"""The per-endpoint circuit breaker state machine, on a fake clock: no sleeps, no mocks."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from agentmesh import (
    AgentUnavailable,
    ConnectionFailed,
    ConnectionLost,
    DeadlineExceeded,
    InvalidInput,
    MeshUnavailable,
    PolicyDenied,
    RateLimited,
    RemoteAgentError,
)
from agentmesh.sidecar.breaker import (
    Breaker,
    BreakerConfig,
    BreakerState,
    ejected_ratio,
    endpoint_failed,
)


class FakeClock:
    # 1024.0: with the times the tests reach, `now + d - now == d` holds exactly.
    def __init__(self, now: float = 1024.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Transitions = list[tuple[BreakerState, BreakerState]]

#: Exact times: no jitter, only consecutive failures trip unless a test says otherwise.
EXACT = BreakerConfig(jitter=0.0, failure_rate=None)


def make(config: BreakerConfig = EXACT, *, seed: int = 0) -> tuple[Breaker, FakeClock, Transitions]:
    clock = FakeClock()
    changes: Transitions = []
    breaker = Breaker(
        config,
        clock=clock,
        rng=random.Random(seed),
        on_change=lambda old, new: changes.append((old, new)),
    )
    return breaker, clock, changes


def fail(breaker: Breaker, times: int = 1, *, may_eject: bool = True) -> None:
    for _ in range(times):
        assert breaker.try_acquire()
        breaker.record(False, may_eject=may_eject)


def succeed(breaker: Breaker, times: int = 1) -> None:
    for _ in range(times):
        assert breaker.try_acquire()
        breaker.record(True)


def trip(breaker: Breaker) -> None:
    """Five failures in a row: the default threshold, which every config here keeps."""
    fail(breaker, 5)
    assert breaker.state == "open"


def to_half_open(breaker: Breaker, clock: FakeClock) -> None:
    clock.now = breaker.ejected_until
    assert breaker.state == "half_open"


# --- closed: tripping ------------------------------------------------------------------


def test_starts_closed_and_lets_everything_through() -> None:
    breaker = Breaker()
    assert breaker.state == "closed"
    assert breaker.available()
    assert all(breaker.try_acquire() for _ in range(100))
    assert breaker.ejected_until == 0.0
    assert breaker.ejections == 0


@pytest.mark.parametrize("threshold", [1, 5, 7])
def test_trips_after_n_consecutive_failures_and_not_before(threshold: int) -> None:
    breaker, clock, _ = make(BreakerConfig(consecutive_failures=threshold, jitter=0.0))
    fail(breaker, threshold - 1)
    assert breaker.state == "closed"
    fail(breaker)
    assert breaker.state == "open"
    assert breaker.ejected_until == clock.now + 1.0
    assert breaker.ejections == 1


def test_a_success_in_between_resets_the_consecutive_count() -> None:
    breaker, _, _ = make()
    for _ in range(10):
        fail(breaker, 4)
        succeed(breaker)
    assert breaker.state == "closed"
    fail(breaker, 4)
    assert breaker.state == "closed"
    fail(breaker)
    assert breaker.state == "open"


def rate_config(**overrides: Any) -> BreakerConfig:
    return BreakerConfig(
        **{
            "consecutive_failures": 1000,
            "failure_rate": 0.5,
            "min_requests": 20,
            "window": 10.0,
            "jitter": 0.0,
            **overrides,
        }
    )


def test_failure_rate_trips_only_with_min_requests_in_the_window() -> None:
    breaker, _, _ = make(rate_config())
    for _ in range(9):  # 9 of 18 failed: the rate is reached, the volume is not
        succeed(breaker)
        fail(breaker)
    assert breaker.state == "closed"
    succeed(breaker)
    fail(breaker)  # 10 of 20
    assert breaker.state == "open"


def test_failure_rate_below_the_threshold_stays_closed() -> None:
    breaker, _, _ = make(rate_config(failure_rate=0.3))
    for _ in range(30):  # 1 in 4 fails: 25% < 30%
        succeed(breaker, 3)
        fail(breaker)
    assert breaker.state == "closed"


def test_failure_rate_threshold_is_inclusive_despite_float_rounding() -> None:
    breaker, _, _ = make(rate_config(failure_rate=0.3, min_requests=10))
    succeed(breaker, 7)
    fail(breaker, 2)
    assert breaker.state == "closed"
    fail(breaker)  # exactly 3 of 10
    assert breaker.state == "open"


def test_only_a_failure_trips_on_the_rate() -> None:
    breaker, _, _ = make(rate_config())
    fail(breaker, 15)
    succeed(breaker, 4)
    assert breaker.state == "closed"  # 15 of 19: volume not reached
    succeed(breaker)  # 15 of 20, but a success never ejects
    assert breaker.state == "closed"
    fail(breaker)
    assert breaker.state == "open"


def test_old_outcomes_leave_the_window() -> None:
    breaker, clock, _ = make(rate_config())
    fail(breaker, 15)
    clock.advance(10.0)  # all 15 have left the window
    fail(breaker, 15)
    assert breaker.state == "closed"
    clock.advance(5.0)  # the second 15 are still in it
    fail(breaker, 5)
    assert breaker.state == "open"


def test_old_successes_leave_the_window_too() -> None:
    breaker, clock, _ = make(rate_config())
    succeed(breaker, 100)
    clock.advance(9.0)
    fail(breaker, 20)
    assert breaker.state == "closed"  # 20 of 120
    clock.advance(1.0)  # the 100 successes leave
    fail(breaker)
    assert breaker.state == "open"


def test_no_failure_rate_means_consecutive_failures_only() -> None:
    breaker, _, _ = make(BreakerConfig(failure_rate=None, consecutive_failures=3))
    for _ in range(50):
        fail(breaker, 2)
        succeed(breaker)
    assert breaker.state == "closed"


# --- open, half-open, backoff --------------------------------------------------------------


def test_open_rejects_until_the_ejection_ends() -> None:
    breaker, clock, _ = make()
    trip(breaker)
    end = breaker.ejected_until
    clock.now = end - 0.001
    assert breaker.state == "open"
    assert not breaker.available()
    assert not breaker.try_acquire()
    assert breaker.ejected_until == end
    clock.now = end
    assert breaker.available()
    assert breaker.state == "half_open"
    assert breaker.ejected_until == 0.0


@pytest.mark.parametrize("probes", [1, 3])
def test_half_open_lets_exactly_the_configured_probes_through(probes: int) -> None:
    breaker, clock, _ = make(BreakerConfig(jitter=0.0, half_open_probes=probes))
    trip(breaker)
    to_half_open(breaker, clock)
    for _ in range(probes):
        assert breaker.available()
        assert breaker.try_acquire()
    assert not breaker.available()
    assert not breaker.try_acquire()
    assert breaker.state == "half_open"


def test_available_reserves_nothing() -> None:
    breaker, clock, _ = make()
    trip(breaker)
    to_half_open(breaker, clock)
    assert all(breaker.available() for _ in range(5))
    assert breaker.try_acquire()
    assert not breaker.available()


def test_probe_success_closes_and_resets_the_counts() -> None:
    breaker, clock, _ = make()
    trip(breaker)
    to_half_open(breaker, clock)
    assert breaker.try_acquire()
    breaker.record(True)
    assert breaker.state == "closed"
    assert breaker.ejected_until == 0.0
    fail(breaker, 4)
    assert breaker.state == "closed"
    fail(breaker)
    assert breaker.state == "open"


def test_closing_clears_the_window_of_the_failures_that_tripped_it() -> None:
    breaker, clock, _ = make(rate_config(min_requests=4))
    fail(breaker, 4)
    assert breaker.state == "open"
    to_half_open(breaker, clock)
    succeed(breaker)
    assert breaker.state == "closed"
    succeed(breaker, 3)
    fail(breaker)  # 1 of 4, not 5 of 8
    assert breaker.state == "closed"


def test_probe_failure_reopens_with_a_doubled_ejection_capped_at_max() -> None:
    breaker, clock, _ = make(BreakerConfig(jitter=0.0, base_ejection=1.0, max_ejection=5.0))
    trip(breaker)
    lengths = [breaker.ejected_until - clock.now]
    for _ in range(5):
        to_half_open(breaker, clock)
        fail(breaker)
        assert breaker.state == "open"
        lengths.append(breaker.ejected_until - clock.now)
    assert lengths == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert breaker.ejections == 6


def test_backoff_never_overflows_however_many_ejections() -> None:
    breaker, clock, _ = make(BreakerConfig(jitter=0.0, base_ejection=1.0, max_ejection=30.0))
    trip(breaker)
    for _ in range(1100):  # 2.0**1100 would not fit in a float
        to_half_open(breaker, clock)
        fail(breaker)
    assert breaker.ejected_until - clock.now == 30.0
    assert breaker.ejections == 1101


def test_jitter_stays_within_bounds_and_never_exceeds_max() -> None:
    config = BreakerConfig(jitter=0.2, base_ejection=1.0, max_ejection=4.0)
    breaker, clock, _ = make(config, seed=7)
    lengths: list[float] = []
    trip(breaker)
    lengths.append(breaker.ejected_until - clock.now)
    for _ in range(200):
        to_half_open(breaker, clock)
        fail(breaker)
        lengths.append(breaker.ejected_until - clock.now)
    assert 0.8 <= lengths[0] <= 1.2
    assert 1.6 <= lengths[1] <= 2.4
    assert all(3.2 <= length <= 4.0 for length in lengths[2:])
    assert len(set(lengths)) > 50  # jittered, not constant
    assert max(lengths) == 4.0  # the upper half of the jitter at the cap is clamped


def test_jitter_follows_the_injected_rng() -> None:
    def first_ejection(seed: int) -> float:
        breaker, clock, _ = make(BreakerConfig(jitter=0.5), seed=seed)
        trip(breaker)
        return breaker.ejected_until - clock.now

    assert first_ejection(1) == first_ejection(1)
    assert first_ejection(1) != first_ejection(2)


# --- probe timeouts and late outcomes ------------------------------------------------------


def test_probe_timeout_reopens_and_frees_the_slot() -> None:
    breaker, clock, changes = make(BreakerConfig(jitter=0.0, probe_timeout=5.0))
    trip(breaker)
    to_half_open(breaker, clock)
    assert breaker.try_acquire()
    deadline = clock.now + 5.0
    clock.now = deadline - 0.001
    assert breaker.state == "half_open"
    assert not breaker.available()
    clock.now = deadline
    assert breaker.state == "open"
    assert breaker.ejected_until == deadline + 2.0
    assert breaker.ejections == 2
    to_half_open(breaker, clock)
    assert breaker.try_acquire()  # the slot is free again
    assert changes == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
    ]


def test_a_timed_out_probe_is_settled_at_its_deadline_however_late_we_look() -> None:
    breaker, clock, changes = make(BreakerConfig(jitter=0.0, probe_timeout=5.0))
    trip(breaker)
    to_half_open(breaker, clock)
    assert breaker.try_acquire()
    deadline = clock.now + 5.0
    clock.now = deadline + 100.0  # long after the probe's deadline and the 2 s ejection
    assert breaker.state == "half_open"
    assert breaker.available()
    assert changes[-2:] == [("half_open", "open"), ("open", "half_open")]
    assert breaker.ejections == 2


def test_a_breaker_never_sticks_half_open() -> None:
    breaker, clock, _ = make(BreakerConfig(jitter=0.0, probe_timeout=1.0, max_ejection=8.0))
    trip(breaker)
    for _ in range(20):  # probes that never report, over and over
        to_half_open(breaker, clock)
        assert breaker.try_acquire()
        clock.advance(1.0)
        assert breaker.state == "open"
    to_half_open(breaker, clock)
    succeed(breaker)
    assert breaker.state == "closed"


def test_a_released_probe_frees_its_slot_without_a_verdict() -> None:
    breaker, clock, changes = make()
    trip(breaker)
    to_half_open(breaker, clock)
    assert breaker.try_acquire()
    assert not breaker.available()
    breaker.release()  # its caller gave up: nothing learnt about the endpoint
    assert breaker.state == "half_open"
    assert breaker.try_acquire()  # the next call probes at once
    breaker.record(True)
    assert breaker.state == "closed"
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_release_while_closed_or_open_counts_nothing() -> None:
    breaker, _, changes = make()
    fail(breaker, 4)
    assert breaker.try_acquire()
    breaker.release()
    fail(breaker)  # the fifth failure in a row trips it: the release did not reset the count
    assert breaker.state == "open"
    breaker.release()
    assert breaker.state == "open"
    assert changes == [("closed", "open")]


def test_a_late_outcome_while_open_is_ignored() -> None:
    breaker, clock, changes = make(BreakerConfig(jitter=0.0, probe_timeout=5.0))
    trip(breaker)
    to_half_open(breaker, clock)
    assert breaker.try_acquire()
    clock.advance(5.0)
    assert breaker.state == "open"
    until, ejections, seen = breaker.ejected_until, breaker.ejections, len(changes)
    breaker.record(True)
    breaker.record(False)
    assert breaker.state == "open"
    assert (breaker.ejected_until, breaker.ejections, len(changes)) == (until, ejections, seen)


def test_a_late_outcome_while_half_open_without_a_probe_is_ignored() -> None:
    breaker, clock, _ = make(BreakerConfig(jitter=0.0, probe_timeout=5.0))
    trip(breaker)
    to_half_open(breaker, clock)
    assert breaker.try_acquire()
    clock.advance(5.0)
    to_half_open(breaker, clock)
    breaker.record(False)  # the timed-out probe reports, with no probe outstanding
    breaker.record(True)
    assert breaker.state == "half_open"
    assert breaker.available()
    assert breaker.ejections == 2


def test_an_outcome_from_before_the_trip_is_ignored_while_open() -> None:
    breaker, _, _ = make()
    assert breaker.try_acquire()  # a slow request, admitted while closed
    trip(breaker)
    breaker.record(True)
    assert breaker.state == "open"


def test_outcomes_of_extra_probes_after_close_count_as_closed_traffic() -> None:
    breaker, clock, _ = make(BreakerConfig(jitter=0.0, half_open_probes=2))
    trip(breaker)
    to_half_open(breaker, clock)
    assert breaker.try_acquire()
    assert breaker.try_acquire()
    breaker.record(True)
    assert breaker.state == "closed"
    breaker.record(False)  # the second probe: an ordinary closed-state failure
    assert breaker.state == "closed"
    fail(breaker, 3)
    assert breaker.state == "closed"
    fail(breaker)
    assert breaker.state == "open"


# --- may_eject, force_open, reset, decay ---------------------------------------------------


def test_may_eject_false_keeps_it_closed_but_keeps_counting() -> None:
    breaker, _, _ = make()
    fail(breaker, 20, may_eject=False)
    assert breaker.state == "closed"
    assert breaker.ejections == 0
    fail(breaker)  # the cap frees up: the next failure ejects at once
    assert breaker.state == "open"


def test_may_eject_false_keeps_the_failure_rate_from_tripping() -> None:
    breaker, _, _ = make(rate_config())
    fail(breaker, 25, may_eject=False)
    assert breaker.state == "closed"
    fail(breaker)
    assert breaker.state == "open"


def test_may_eject_false_on_a_failed_probe_stays_half_open_and_frees_the_slot() -> None:
    breaker, clock, _ = make()
    trip(breaker)
    to_half_open(breaker, clock)
    fail(breaker, may_eject=False)
    assert breaker.state == "half_open"
    assert breaker.available()
    fail(breaker)
    assert breaker.state == "open"


def test_force_open_uses_the_backoff_and_counts_as_an_ejection() -> None:
    breaker, clock, changes = make()
    breaker.force_open()
    assert breaker.state == "open"
    assert breaker.ejected_until == clock.now + 1.0
    to_half_open(breaker, clock)
    breaker.force_open()
    assert breaker.ejected_until == clock.now + 2.0
    assert breaker.ejections == 2
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "open")]


def test_force_open_for_explicit_seconds_does_not_grow_the_backoff() -> None:
    breaker, clock, _ = make()
    breaker.force_open(60.0)
    assert breaker.ejected_until == clock.now + 60.0
    assert breaker.ejections == 0
    to_half_open(breaker, clock)
    fail(breaker)
    assert breaker.ejected_until == clock.now + 1.0


def test_force_open_never_shortens_an_ejection_under_way() -> None:
    breaker, clock, changes = make()
    breaker.force_open(60.0)
    breaker.force_open(1.0)
    assert breaker.ejected_until == clock.now + 60.0
    breaker.force_open(120.0)
    assert breaker.ejected_until == clock.now + 120.0
    assert changes == [("closed", "open")]


def test_force_open_until_reset() -> None:
    breaker, clock, _ = make()
    breaker.force_open(math.inf)
    clock.advance(1e9)
    assert breaker.state == "open"
    breaker.reset()
    assert breaker.state == "closed"


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.nan])
def test_force_open_rejects_a_non_positive_duration(seconds: float) -> None:
    breaker, _, _ = make()
    with pytest.raises(ValueError, match="seconds"):
        breaker.force_open(seconds)
    assert breaker.state == "closed"


def test_reset_closes_and_clears_every_count() -> None:
    breaker, clock, changes = make()
    trip(breaker)
    to_half_open(breaker, clock)
    fail(breaker)
    assert breaker.ejections == 2
    breaker.reset()
    assert breaker.state == "closed"
    assert breaker.ejections == 0
    assert breaker.ejected_until == 0.0
    fail(breaker, 4)
    assert breaker.state == "closed"
    fail(breaker)
    assert breaker.ejected_until == clock.now + 1.0  # the backoff starts over
    assert changes[-2:] == [("open", "closed"), ("closed", "open")]


def test_reset_when_closed_fires_nothing() -> None:
    breaker, _, changes = make()
    fail(breaker, 4)
    breaker.reset()
    fail(breaker, 4)
    assert breaker.state == "closed"
    assert changes == []


def test_ejections_survive_a_close_and_decay_after_max_ejection_closed() -> None:
    breaker, clock, _ = make(BreakerConfig(jitter=0.0, failure_rate=None, max_ejection=30.0))
    trip(breaker)
    to_half_open(breaker, clock)
    succeed(breaker)
    assert breaker.ejections == 1
    clock.advance(29.9)  # flaps: trips again soon after closing
    trip(breaker)
    assert breaker.ejected_until == clock.now + 2.0
    to_half_open(breaker, clock)
    succeed(breaker)
    closed_at = clock.now
    clock.now = closed_at + 29.9
    assert breaker.ejections == 2
    clock.now = closed_at + 30.0  # 30 s closed without tripping
    assert breaker.ejections == 0
    trip(breaker)
    assert breaker.ejected_until == clock.now + 1.0


def test_decay_applies_at_the_next_trip_even_unobserved() -> None:
    breaker, clock, _ = make()
    trip(breaker)
    to_half_open(breaker, clock)
    succeed(breaker)
    clock.advance(30.0)
    trip(breaker)  # nobody read `ejections` in between
    assert breaker.ejected_until == clock.now + 1.0
    assert breaker.ejections == 1


# --- on_change and ejected_ratio -------------------------------------------------------------


def test_on_change_fires_once_per_transition_over_a_full_cycle() -> None:
    breaker, clock, changes = make()
    trip(breaker)
    assert changes == [("closed", "open")]
    clock.now = breaker.ejected_until
    for _ in range(3):  # the lazy transition is discovered by whichever call comes first
        assert breaker.available()
        assert breaker.state == "half_open"
    assert breaker.try_acquire()
    breaker.record(True)
    assert breaker.state == "closed"
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


@pytest.mark.parametrize("first_look", ["state", "available", "try_acquire", "ejected_until"])
def test_each_entry_point_discovers_the_lazy_transition_once(first_look: str) -> None:
    breaker, clock, changes = make()
    trip(breaker)
    clock.now = breaker.ejected_until
    attribute = getattr(breaker, first_look)
    if callable(attribute):
        attribute()
    assert changes == [("closed", "open"), ("open", "half_open")]
    assert breaker.state == "half_open"
    assert len(changes) == 2


def test_ejected_ratio() -> None:
    assert ejected_ratio([]) == 0.0
    clock = FakeClock()
    breakers = [Breaker(EXACT, clock=clock) for _ in range(4)]
    assert ejected_ratio(breakers) == 0.0
    trip(breakers[0])
    assert ejected_ratio(breakers) == 0.25
    breakers[1].force_open(10.0)
    assert ejected_ratio(iter(breakers)) == 0.5
    clock.advance(1.0)  # breakers[0] is half-open now: taking probes, not ejected
    assert ejected_ratio(breakers) == 0.25


# --- config validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("consecutive_failures", 0),
        ("consecutive_failures", 2.5),
        ("consecutive_failures", True),
        ("min_requests", 0),
        ("half_open_probes", 0),
        ("half_open_probes", -1),
        ("window", 0.0),
        ("window", -1.0),
        ("window", math.inf),
        ("base_ejection", 0.0),
        ("base_ejection", math.nan),
        ("max_ejection", -5.0),
        ("probe_timeout", 0.0),
        ("probe_timeout", "5"),
        ("failure_rate", 0.0),
        ("failure_rate", 1.5),
        ("failure_rate", math.nan),
        ("jitter", -0.1),
        ("jitter", 1.0),
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        BreakerConfig(**{field: value})  # type: ignore[arg-type]


def test_max_ejection_below_base_ejection_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_ejection"):
        BreakerConfig(base_ejection=10.0, max_ejection=5.0)


def test_config_edges_are_accepted() -> None:
    BreakerConfig(failure_rate=1.0, jitter=0.0, base_ejection=2.0, max_ejection=2.0)
    BreakerConfig(failure_rate=None)
    BreakerConfig(window=1, probe_timeout=1)  # ints are numbers too


def test_equal_base_and_max_ejection_never_grows() -> None:
    breaker, clock, _ = make(BreakerConfig(jitter=0.0, base_ejection=3.0, max_ejection=3.0))
    trip(breaker)
    for _ in range(3):
        to_half_open(breaker, clock)
        fail(breaker)
        assert breaker.ejected_until == clock.now + 3.0


# --- what counts against an endpoint ----------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (ConnectionFailed("refused"), True),
        (ConnectionLost("reset, or the per-try timeout passed"), True),
        (DeadlineExceeded("no reply in time, here or at the agent"), True),
        (MeshUnavailable("502"), True),
        (AgentUnavailable("draining"), False),
        (RateLimited("429"), False),
        (RemoteAgentError("the capability raised"), False),
        (InvalidInput("bad"), False),
        (PolicyDenied("no"), False),
    ],
)
def test_what_counts_as_the_endpoints_failure(error: Exception, counts: bool) -> None:
    assert endpoint_failed(error) is counts
