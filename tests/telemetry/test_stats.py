"""The sidecar's stats collector: histogram math, reports, and their cost on the call path."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from agentmesh.models import StatsReport
from agentmesh.telemetry.stats import (
    BUCKETS,
    LATENCY_BOUNDS,
    LATENCY_SCHEME,
    StatsCollector,
    bucket_of,
    percentile,
)

#: Neighbouring bounds differ by this factor: a percentile estimate is within it of the truth.
RATIO = 2 ** (1 / 4)


def dense(report: StatsReport, index: int = 0) -> list[int]:
    hist = [0] * BUCKETS
    for i, n in report.entries[index].buckets:
        hist[i] = n
    return hist


def nearest_rank(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def test_bounds_are_log_spaced_and_buckets_are_inclusive_upper_bounds():
    assert LATENCY_BOUNDS[0] == pytest.approx(1e-4)
    for lo, hi in itertools.pairwise(LATENCY_BOUNDS):
        assert hi / lo == pytest.approx(RATIO)
    assert LATENCY_BOUNDS[-1] > 60  # minutes-long agent calls still land in a real bucket
    for i, bound in enumerate(LATENCY_BOUNDS):
        assert bucket_of(bound) == i
        assert bucket_of(bound * 1.0001) == i + 1
    assert bucket_of(0.0) == 0
    assert bucket_of(1e9) == BUCKETS - 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_from_the_histogram_are_within_one_bucket(seed: int):
    rng = random.Random(seed)
    samples = [rng.lognormvariate(math.log(0.02), 1.2) for _ in range(5000)]
    collector = StatsCollector("s-1")
    for s in samples:
        collector.outbound("orchestrator", "summarize", "summarizer", True, s)
    report = collector.take()
    assert report is not None
    (entry,) = report.entries
    assert entry.count == len(samples)
    assert entry.total == pytest.approx(sum(samples))
    hist = dense(report)
    for q in (0.5, 0.9, 0.95, 0.99, 1.0):
        exact = nearest_rank(samples, q)
        estimate = percentile(hist, q)
        assert estimate is not None
        assert exact / RATIO <= estimate <= exact * RATIO, (q, exact, estimate)


def test_a_single_value_and_the_overflow_bucket():
    hist = [0] * BUCKETS
    hist[bucket_of(0.010)] = 1
    p = percentile(hist, 0.5)
    assert p is not None
    assert 0.010 / RATIO <= p <= 0.010 * RATIO
    assert percentile([0] * BUCKETS, 0.5) is None
    hist = [0] * BUCKETS
    hist[-1] = 3
    assert percentile(hist, 0.99) == LATENCY_BOUNDS[-1]


def test_histograms_merge_by_adding_counts():
    rng = random.Random(7)
    a, b = StatsCollector("a"), StatsCollector("b")
    samples_a = [rng.uniform(0.001, 0.5) for _ in range(700)]
    samples_b = [rng.uniform(0.1, 2.0) for _ in range(300)]
    for s in samples_a:
        a.outbound("c", "x", "y", True, s)
    for s in samples_b:
        b.outbound("c", "x", "y", True, s)
    ra, rb = a.take(), b.take()
    assert ra is not None
    assert rb is not None
    merged = [x + y for x, y in zip(dense(ra), dense(rb), strict=True)]
    both = samples_a + samples_b
    for q in (0.5, 0.95, 0.99):
        estimate = percentile(merged, q)
        assert estimate is not None
        exact = nearest_rank(both, q)
        assert exact / RATIO <= estimate <= exact * RATIO


def test_keys_are_counted_apart_and_each_interval_starts_empty():
    collector = StatsCollector("orchestrator-1")
    for _ in range(3):
        collector.outbound("orchestrator", "work", "worker", True, 0.01)
    collector.outbound("orchestrator", "work", "worker", False, 0.02)
    collector.outbound("orchestrator", "work", "-", False, 0.0001)
    collector.inbound("orchestrator", "plan", 200, 0.05)
    collector.inbound("orchestrator", "plan", 500, 0.05)
    report = collector.take()
    assert report is not None
    assert report.reporter == "orchestrator-1"
    assert report.scheme == LATENCY_SCHEME
    assert report.start <= report.end
    rows = {(e.direction, e.agent, e.capability, e.peer, e.status): e.count for e in report.entries}
    assert rows == {
        ("outbound", "orchestrator", "work", "worker", "ok"): 3,
        ("outbound", "orchestrator", "work", "worker", "error"): 1,
        ("outbound", "orchestrator", "work", "-", "error"): 1,
        ("inbound", "orchestrator", "plan", "-", "200"): 1,
        ("inbound", "orchestrator", "plan", "-", "500"): 1,
    }
    again = StatsReport.model_validate_json(report.model_dump_json())
    assert again == report
    assert collector.take() is None
