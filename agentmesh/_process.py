"""Child processes that never outlive their parent.

Leftover servers keep ports and store locks and break the next run, so every child we spawn
(nats-server, the demo's agents) gets a parent-death signal on Linux and its own session
(a terminal's Ctrl-C reaches the parent, which then stops its children in order).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["parent_death_hook"]

_PR_SET_PDEATHSIG = 1


def parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux SIGTERM the child when its parent dies.

    libc is loaded here, in the parent, so the forked child only makes the system call.
    Returns None where prctl does not exist (macOS, Windows): there the session and the
    ``atexit`` hook are the only guards.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def hook() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return hook
