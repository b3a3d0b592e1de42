"""Freezing a process the way a hung one looks: connected, and nothing ever answers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["freeze"]

_WAIT = 5.0
"""Seconds for every thread to stop: SIGSTOP is delivered asynchronously, and until a thread
of the target runs again it may still answer what is already on its way."""


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads is stopped (``T``)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + _WAIT
    while not _stopped(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {_WAIT:g}s of SIGSTOP")
        time.sleep(0.001)


def _stopped(pid: int) -> bool:
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state not in ("T", "t"):
            return False
    return True
