"""What /proc says about a process and the machine: CPU time, peak RSS, name (no psutil)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Final

__all__ = [
    "machine_cpu_seconds",
    "pids_cpu_seconds",
    "pids_peak_rss_kb",
    "proc_cpu_seconds",
    "proc_name",
    "proc_peak_rss_kb",
    "proc_rss_kb",
    "reset_peak_rss",
]


_CLK_TCK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` (all its threads) from /proc/<pid>/stat.

    Fields are counted after the last ``)`` because the command name may contain spaces;
    utime and stime are fields 14 and 15, in clock ticks (usually 10 ms each).
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    rest = data[data.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK


def proc_name(pid: int) -> str:
    """The command name of ``pid`` (``/proc/<pid>/comm``), or ``pid <n>`` when unreadable."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return f"pid {pid}"


def _status_kb(pid: int, field: bytes) -> int:
    """A ``kB`` field of /proc/<pid>/status; 0 when absent (a zombie has no memory lines)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def proc_peak_rss_kb(pid: int) -> int:
    """Peak resident set size (VmHWM, kB) of ``pid``: the high-water mark since the last reset."""
    return _status_kb(pid, b"VmHWM:")


def proc_rss_kb(pid: int) -> int | None:
    """Resident set size now (VmRSS, kB) of ``pid``; None when it is gone (a killed node)."""
    try:
        return _status_kb(pid, b"VmRSS:") or None
    except OSError:
        return None


def reset_peak_rss(pid: int) -> bool:
    """Reset ``pid``'s VmHWM to its current RSS (``5`` into clear_refs, Linux >= 4.0).

    Without this the peak would be the one since process start (imports, warm-up, earlier
    workloads); with it, it is the peak during the workload being measured.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, summed over CPUs (/proc/stat).

    Busy is user+nice+system+irq+softirq. Around a round, busy minus our own processes'
    CPU is what other processes took, and steal is what the hypervisor gave to other
    guests: the two ways a shared machine spoils a measurement, so both are reported.
    """
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return (math.nan, math.nan)
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return ((user + nice + system + irq + softirq) / _CLK_TCK, steal / _CLK_TCK)


def pids_cpu_seconds(pids: Iterable[int]) -> float:
    return sum(proc_cpu_seconds(pid) for pid in pids)


def pids_peak_rss_kb(pids: Iterable[int]) -> int:
    return sum(proc_peak_rss_kb(pid) for pid in pids)
