"""What a run measured: per-round numbers, their reduction to medians per target, and the
whole run as JSON (``--json``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .targets import Target
from .workloads import METRICS, ClosedLoop, Metric, Timing, Workload

__all__ = [
    "RoundResult",
    "TargetSummary",
    "WorkloadResult",
    "jsonable",
    "percentile",
    "report_json",
    "summarize",
]


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN when empty)."""
    if not sorted_values:
        return math.nan
    return float(sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)])


@dataclass
class RoundResult:
    """One target in one round of one workload."""

    target: str
    round: int
    calls: int
    errors: int
    elapsed_s: float
    calls_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_cpu_s_per_1k: float
    client_cpu_s_per_1k: float
    server_peak_rss_mb: float
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    offpath_cpu_s: float = 0.0
    """CPU seconds of the target's off-path processes (included in ``server_cpu_s``)."""
    offpath_rss_mb: float = 0.0
    """Peak RSS of the target's off-path processes (included in ``server_peak_rss_mb``)."""
    offpath: str = ""
    """Names (``/proc/<pid>/comm``) of the target's off-path processes, comma-separated."""
    other_cpu_pct: float = math.nan
    """CPU taken by processes outside the benchmark, % of the machine (all CPUs)."""
    steal_pct: float = math.nan
    """CPU stolen by the hypervisor, % of the machine."""
    scheduled: int = 0
    missed: int = 0
    send_lag_p50_ms: float = math.nan
    send_lag_p99_ms: float = math.nan
    first_error: str | None = None


@dataclass
class TargetSummary:
    """A target's rounds of one workload, reduced to medians (and sums of counts).

    ``median`` holds medians over rounds, except the two CPU figures, which are pooled.
    """

    target: str
    median: dict[str, float]
    calls: int
    errors: int
    scheduled: int
    missed: int
    spread: float
    """(max - min) / median of the workload's primary metric over the rounds."""
    rounds: list[RoundResult] = field(default_factory=list)
    first_error: str | None = None


@dataclass
class WorkloadResult:
    """One workload of one scenario: a summary per target, in registry order."""

    scenario: str
    workload: Workload
    label: str
    summaries: dict[str, TargetSummary]
    rss_reset: bool


def summarize(target: str, rounds: list[RoundResult], primary: Metric) -> TargetSummary:
    median: dict[str, float] = {}
    for metric in METRICS:
        values = [v for r in rounds if not math.isnan(v := float(getattr(r, metric)))]
        median[metric] = statistics.median(values) if values else math.nan
    # CPU is pooled (all rounds' CPU over all rounds' calls) rather than a median of
    # per-round ratios: /proc/<pid>/stat counts in 10 ms ticks, and pooling shrinks that
    # quantisation where a median would keep it.
    calls = sum(r.calls for r in rounds)
    if calls:
        median["server_cpu_s_per_1k"] = 1000 * sum(r.server_cpu_s for r in rounds) / calls
        median["client_cpu_s_per_1k"] = 1000 * sum(r.client_cpu_s for r in rounds) / calls
    prim = [float(getattr(r, primary)) for r in rounds]
    prim = [v for v in prim if not math.isnan(v)]
    mid = statistics.median(prim) if prim else math.nan
    spread = (max(prim) - min(prim)) / mid if prim and mid else math.nan
    return TargetSummary(
        target=target,
        median=median,
        calls=calls,
        errors=sum(r.errors for r in rounds),
        scheduled=sum(r.scheduled for r in rounds),
        missed=sum(r.missed for r in rounds),
        spread=spread,
        rounds=rounds,
        first_error=next((r.first_error for r in rounds if r.first_error), None),
    )


def jsonable(value: Any) -> Any:
    """NaN is not JSON: turn it into null, recursively."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def report_json(
    info: Mapping[str, Any],
    timing: Timing,
    payload: bytes,
    targets: Mapping[str, Target],
    results: Sequence[WorkloadResult],
    baselines: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """The whole run as a JSON-able dict (``--json``), per-round numbers included."""
    out_results = []
    for res in results:
        wl = res.workload
        out_results.append(
            {
                "scenario": res.scenario,
                "workload": wl.key,
                "kind": "closed" if isinstance(wl, ClosedLoop) else "open",
                "label": res.label,
                "params": asdict(wl),
                "seconds_per_round": wl.seconds(timing),
                "primary": wl.primary,
                "rss_reset": res.rss_reset,
                "baselines": list(baselines.get(res.scenario, ())),
                "targets": {
                    name: {
                        "median": s.median,
                        "calls": s.calls,
                        "errors": s.errors,
                        "scheduled": s.scheduled,
                        "missed": s.missed,
                        "spread": s.spread,
                        "first_error": s.first_error,
                        "ratios": {
                            b: {
                                m: s.median[m] / res.summaries[b].median[m]
                                if res.summaries[b].median[m]
                                else math.nan
                                for m in METRICS
                            }
                            for b in baselines.get(res.scenario, ())
                            if b in res.summaries
                        },
                        "rounds": [asdict(r) for r in s.rounds],
                    }
                    for name, s in res.summaries.items()
                },
            }
        )
    out: dict[str, Any] = jsonable(
        {
            "machine": dict(info),
            "timing": asdict(timing),
            "payload_bytes": len(payload),
            "targets": {
                name: {"description": t.description, "details": t.details()}
                for name, t in targets.items()
            },
            "results": out_results,
        }
    )
    return out
