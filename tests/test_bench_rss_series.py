"""bench/rss_series.py: the soak's memory verdict (RSS samples of real processes, the slope)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rss_series import RssSeries, slope_mib_per_10min


def test_slope_is_mib_per_10_minutes_of_a_line_and_none_without_enough_points() -> None:
    growing = [(60.0 * m, 1000 + 512 * m) for m in range(10)]  # 0.5 MiB a minute
    assert slope_mib_per_10min(growing) == pytest.approx(5.0)
    assert slope_mib_per_10min([(0.0, 1000), (60.0, 1000), (120.0, 1000)]) == 0.0
    assert slope_mib_per_10min(growing[:2]) is None


def test_a_process_that_is_gone_is_skipped_and_keeps_its_name_when_it_returns(
    tmp_path: Path,
) -> None:
    """A killed node has no sample while it is down; its restart (a new pid) continues the same
    series, and the JSON holds every sample and each window's slope."""
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pids: dict[str, int | None] = {"node": first.pid}
    series = RssSeries(lambda: pids)
    try:
        series.sample()
        first.kill()
        first.wait()
        series.sample()
        assert len(series.samples["node"]) == 1
        second = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            pids["node"] = second.pid
            series.mark("whole")
            series.sample()
            series.sample()
        finally:
            second.kill()
            second.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert len(series.samples["node"]) == 3
    assert all(kib > 0 for _, kib in series.samples["node"])
    windows = [("all", 0.0, series.now())]
    lines = series.table(windows, every=300.0)
    assert lines[-1].startswith("  node ")
    out = tmp_path / "series.json"
    series.write_json(out, windows)
    data = json.loads(out.read_text())
    assert len(data["rss_kib"]["node"]) == 3
    assert set(data["marks_s"]) == {"whole"}
    assert data["slopes_mib_per_10min"]["node"]["all"] is not None
