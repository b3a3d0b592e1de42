"""RSS over time for a set of named processes, and whether it still grows: a soak's memory verdict.

One sample reads every process's VmRSS (``/proc/<pid>/status``); a process that is gone (a
killed node) is skipped for that sample, and a restarted one keeps its name. The verdict is a
least-squares slope in MiB per 10 minutes over a window: over the first half (after warm-up) a
process settling or leaking both grow, over the second half (after the node restart settles)
settling shows as a flat line and a leak as the same slope again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench.procfs import proc_rss_kb

__all__ = ["RssSeries", "slope_mib_per_10min"]


def slope_mib_per_10min(points: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (seconds, KiB) points in MiB per 10 minutes; None under 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 600 / 1024


@dataclass
class RssSeries:
    """Samples of named processes' RSS; ``t`` in seconds since :attr:`started`."""

    pids: Callable[[], Mapping[str, int | None]]
    """Names to current pids (a node's pid changes when it restarts; None while it is down)."""
    started: float = field(default_factory=time.monotonic)
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)
    """Named moments (``kill``, ``whole``) in the same seconds as the samples."""

    def now(self) -> float:
        return time.monotonic() - self.started

    def mark(self, name: str) -> None:
        self.marks[name] = self.now()

    def sample(self) -> None:
        t = self.now()
        for name, pid in self.pids().items():
            rss = proc_rss_kb(pid) if pid is not None else None
            if rss is not None:
                self.samples.setdefault(name, []).append((t, rss))

    def window(self, name: str, start: float, end: float) -> list[tuple[float, int]]:
        return [(t, v) for t, v in self.samples.get(name, []) if start <= t <= end]

    def table(self, windows: list[tuple[str, float, float]], every: float) -> list[str]:
        """Lines: each process's RSS (MiB) at every ``every`` seconds (the nearest sample), its
        last sample, and its slope over each named window."""
        end = max((s[-1][0] for s in self.samples.values() if s), default=0.0)
        columns = [c * every for c in range(int(end // every) + 1)]
        if not columns or end - columns[-1] > every / 4:
            columns.append(end)
        width = max((len(name) for name in self.samples), default=0)
        spans = ", ".join(f"{label} {s / 60:.1f}-{e / 60:.1f}" for label, s, e in windows)
        lines = [
            f"  RSS (MiB) by minute; slope (MiB per 10 min, least squares) over the {spans} min:",
            f"  {'minute':<{width}} {' '.join(f'{t / 60:5.1f}' for t in columns)} | "
            + " ".join(f"{label:>8}" for label, _, _ in windows),
        ]
        for name, points in self.samples.items():
            cells = " ".join(_cell(_nearest(points, t, every / 2)) for t in columns)
            rates = " ".join(
                f"{_signed(slope_mib_per_10min(self.window(name, s, e))):>8}" for _, s, e in windows
            )
            lines.append(f"  {name:<{width}} {cells} | {rates}")
        return lines

    def write_json(self, path: Path, windows: list[tuple[str, float, float]]) -> None:
        data = {
            "marks_s": self.marks,
            "windows_s": {label: [s, e] for label, s, e in windows},
            "slopes_mib_per_10min": {
                name: {
                    label: slope_mib_per_10min(self.window(name, s, e)) for label, s, e in windows
                }
                for name in self.samples
            },
            "rss_kib": {
                name: [[round(t, 1), v] for t, v in points] for name, points in self.samples.items()
            },
        }
        path.write_text(json.dumps(data, indent=1) + "\n")


def _nearest(points: list[tuple[float, int]], t: float, within: float) -> int | None:
    best = min(points, key=lambda p: abs(p[0] - t), default=None)
    return best[1] if best is not None and abs(best[0] - t) <= within else None


def _cell(kib: int | None) -> str:
    return f"{kib / 1024:5.1f}" if kib is not None else "    -"


def _signed(mib: float | None) -> str:
    return f"{mib:+.2f}" if mib is not None else "-"
