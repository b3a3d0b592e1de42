"""The settings of the outbound layers: plain, frozen values that import nothing of agentmesh.

A leaf, as httpx keeps its config in ``_config.py``: the layers that read these values
(``sidecar/retry.py``, ``breaker.py``, ``balance.py``) and the policies that produce them
(``policy/traffic.py``, ``policy/cache.py``) both import this module, and never each other.
``tests/test_layering.py`` checks that it stays so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["BreakerConfig", "RetryPolicy", "Strategy", "TrafficRoute"]

Strategy = Literal["p2c", "round_robin", "random"]
"""How the balance layer chooses among healthy endpoints (``sidecar/balance.py``)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one call may be retried (``sidecar/retry.py``); ``Mesh.call(retries=...)`` overrides
    ``attempts``."""

    attempts: int = 3
    """Total attempts including the first (Linkerd/Envoy default to a few; 3 bounds the tail)."""
    backoff: float = 0.025
    """First backoff in seconds; doubles per retry, with full jitter."""
    max_backoff: float = 0.25
    """Ceiling of one backoff: retries are for transient failures, not outages."""
    per_try_timeout: float | None = None
    """Bound on every attempt, in seconds (Envoy's ``per_try_timeout``); idempotent calls retry
    on another endpoint when it passes. None: ``per_try_share`` of the call's budget, for calls
    that may be retried after a timeout (idempotent ones) only."""
    per_try_share: float = 0.5
    """Without ``per_try_timeout``: the share of the call's budget one attempt of an idempotent
    call may spend (1.0: the whole budget). A half leaves a retry on another replica as much
    time as the attempt that froze had."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < self.backoff:
            raise ValueError("backoff must be >= 0 and max_backoff >= backoff")
        if self.per_try_timeout is not None and not self.per_try_timeout > 0:
            raise ValueError(f"per_try_timeout must be > 0, got {self.per_try_timeout}")
        if not 0 < self.per_try_share <= 1:
            raise ValueError(f"per_try_share must be in (0, 1], got {self.per_try_share}")


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When an endpoint is ejected, for how long, and how it is let back in (the defaults and
    their reasons: ``sidecar/breaker.py``)."""

    consecutive_failures: int = 5
    failure_rate: float | None = 0.5
    min_requests: int = 20
    window: float = 10.0
    base_ejection: float = 1.0
    max_ejection: float = 30.0
    jitter: float = 0.2
    half_open_probes: int = 1
    probe_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("consecutive_failures", "min_requests", "half_open_probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("window", "base_ejection", "max_ejection", "probe_timeout"):
            value = getattr(self, name)
            if not _is_number(value) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.failure_rate is not None and not (
            _is_number(self.failure_rate) and 0 < self.failure_rate <= 1
        ):
            raise ValueError(f"failure_rate must be in (0, 1] or None, got {self.failure_rate!r}")
        if not (_is_number(self.jitter) and 0 <= self.jitter < 1):
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.max_ejection < self.base_ejection:
            raise ValueError(
                f"max_ejection ({self.max_ejection!r}) must be >= base_ejection "
                f"({self.base_ejection!r})"
            )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class TrafficRoute:
    """The settings a TrafficPolicy gives calls to one capability (or one version subset).

    The route layer puts it on ``OutboundCall.traffic``; the deadline layer reads ``timeout``,
    retry ``retry``, balance ``balance`` and the breaker ``breaker``. None: the sidecar's own.
    """

    policy: str
    subset: str | None = None
    timeout: float | None = None
    retry: RetryPolicy | None = None
    breaker: BreakerConfig | None = None
    balance: Strategy | None = None
