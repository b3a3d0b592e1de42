"""What a target is asked to do: the payload, the timing profiles and the two kinds of loop
(closed: capacity and serial latency; open: latency without coordinated omission)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

__all__ = [
    "FULL",
    "HIGHER_IS_BETTER",
    "METRICS",
    "QUICK",
    "ClosedLoop",
    "Metric",
    "OpenLoop",
    "Timing",
    "Workload",
    "make_payload",
]


def make_payload(size: int = 1024) -> bytes:
    """A compact JSON object of exactly ``size`` bytes, shaped like a small agent request.

    Its fields match the pydantic model of the FastAPI baseline (``bench/_servers.py``),
    so every target can take the same bytes; ``text`` is padded to reach the size.
    """
    doc: dict[str, Any] = {
        "id": 42,
        "agent": "summarizer",
        "tags": ["nlp", "en"],
        "params": {"temperature": 0.2, "top_p": 0.9},
        "text": "",
    }
    base = len(json.dumps(doc, separators=(",", ":")).encode())
    if size < base:
        raise ValueError(f"payload size {size} is below the minimum of {base} bytes")
    filler = "lorem ipsum dolor sit amet "
    doc["text"] = (filler * (size // len(filler) + 1))[: size - base]
    out = json.dumps(doc, separators=(",", ":")).encode()
    assert len(out) == size
    return out


Metric = Literal[
    "calls_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "server_cpu_s_per_1k",
    "client_cpu_s_per_1k",
    "server_peak_rss_mb",
    "send_lag_p50_ms",
    "send_lag_p99_ms",
]
METRICS: Final[tuple[Metric, ...]] = get_args(Metric)
HIGHER_IS_BETTER: Final[frozenset[Metric]] = frozenset({"calls_per_s"})


@dataclass(frozen=True)
class Timing:
    """How long and how often: one profile for CI (``QUICK``), one for real numbers."""

    rounds: int
    warmup_s: float
    closed_s: float
    open_s: float
    drain_s: float = 10.0
    """After a run's time is up, how long in-flight calls may still finish (then: errors)."""
    quick: bool = False
    """The CI smoke profile: :class:`Measurement` scenarios then use small parameters too."""


QUICK: Final = Timing(rounds=3, warmup_s=0.2, closed_s=0.5, open_s=1.5, quick=True)
FULL: Final = Timing(rounds=5, warmup_s=0.5, closed_s=1.5, open_s=2.5)


@dataclass(frozen=True)
class ClosedLoop:
    """``concurrency`` callers, each sending its next call when the previous one returns.

    With 1 in flight this is serial latency; with many, capacity. Stops after
    ``count`` calls or ``duration_s`` (default: the profile's ``closed_s``).
    """

    concurrency: int
    duration_s: float | None = None
    count: int | None = None
    primary: Metric = "p50_ms"

    @property
    def key(self) -> str:
        """Stable name for JSON output."""
        return f"closed-{self.concurrency}"

    def label(self, timing: Timing) -> str:
        """Human description with the effective length."""
        length = f"{self.count} calls" if self.count else f"{self.seconds(timing):g} s"
        return f"closed loop, {self.concurrency} in flight, {length}"

    def seconds(self, timing: Timing) -> float:
        """Effective duration under ``timing``."""
        return self.duration_s if self.duration_s is not None else timing.closed_s


@dataclass(frozen=True)
class OpenLoop:
    """Sends scheduled at ``rate`` per second regardless of replies (no coordinated omission).

    Latency counts from the scheduled send time; a call that starts more than
    ``slack_ms`` after its slot is counted as having missed it.
    """

    rate: float
    duration_s: float | None = None
    slack_ms: float = 1.0
    primary: Metric = "p99_ms"

    @property
    def key(self) -> str:
        """Stable name for JSON output."""
        return f"open-{self.rate:g}"

    def label(self, timing: Timing) -> str:
        """Human description with the effective length."""
        return f"open loop, {self.rate:g} calls/s, {self.seconds(timing):g} s"

    def seconds(self, timing: Timing) -> float:
        """Effective duration under ``timing``."""
        return self.duration_s if self.duration_s is not None else timing.open_s


Workload = ClosedLoop | OpenLoop
