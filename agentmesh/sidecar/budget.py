"""Retry budgets: retries may add at most a fixed share of recent traffic, plus a small floor.

As Linkerd's (20% + 10/s over 10 s) and Envoy's retry budgets: during an outage every call
fails, and unbounded retries would multiply the load on whatever is left. With a budget the
extra load stays bounded whatever the failure rate, while a quiet sidecar (whose 20% is almost
nothing) can still retry its occasional failure thanks to the floor.

Counters live in one-second buckets over the window, so recording is O(1) and old traffic
leaves the window without a timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RetryBudget", "RetryBudgetConfig"]


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    ratio: float = 0.2
    """Retries allowed per original request in the window (Linkerd and Envoy use 20%)."""
    min_per_second: float = 10.0
    """Retries always allowed per second, so low-traffic callers can still retry."""
    window: int = 10
    """Seconds of traffic the budget looks back on."""

    def __post_init__(self) -> None:
        if not 0 <= self.ratio <= 10:
            raise ValueError(f"ratio must be between 0 and 10, got {self.ratio}")
        if self.min_per_second < 0:
            raise ValueError(f"min_per_second must be >= 0, got {self.min_per_second}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 second, got {self.window}")


class RetryBudget:
    """Counts requests and retries; ``try_spend`` says whether one more retry fits."""

    def __init__(
        self,
        config: RetryBudgetConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or RetryBudgetConfig()
        self._clock = clock
        size = self.config.window
        self._requests = [0] * size
        self._retries = [0] * size
        self._stamps = [-1] * size
        self.spent = 0
        self.refused = 0

    def _slot(self) -> int:
        second = int(self._clock())
        slot = second % self.config.window
        if self._stamps[slot] != second:
            self._stamps[slot] = second
            self._requests[slot] = 0
            self._retries[slot] = 0
        return slot

    def record_request(self) -> None:
        """An original request (not a retry) was sent."""
        self._requests[self._slot()] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget if it allows; False means: do not retry."""
        slot = self._slot()
        now = self._stamps[slot]
        oldest = now - self.config.window
        requests = retries = 0
        for i, stamp in enumerate(self._stamps):
            if stamp > oldest:
                requests += self._requests[i]
                retries += self._retries[i]
        allowed = self.config.ratio * requests + self.config.min_per_second * self.config.window
        if retries + 1 > allowed:
            self.refused += 1
            return False
        self._retries[slot] += 1
        self.spent += 1
        return True
