"""Stopping a background task within a bound, even when its cancellation is lost.

``task.cancel(); await task`` waits for ever if the task does not end, and on Python 3.11 a loop
that keeps calling NATS may not: ``asyncio.wait_for`` (nats-py awaits every request reply with it)
returns the reply instead of raising when the cancellation and the reply arrive in the same loop
turn (python/cpython#86296, fixed in 3.12). The cancellation is then gone and the loop goes on: a
lease renewed for ever after its agent was told to stop, and the stop waited for ever with it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["STOP_WAIT", "stop_task"]

_log = logging.getLogger("agentmesh")

STOP_WAIT = 5.0
"""Seconds a stopping component waits for one of its tasks. A cancelled task ends within a loop
turn, or within the NATS request it was in when a cancellation was lost (the next one ends it);
one still running after this is stuck, and is left behind rather than holding up the stop."""

_RECANCEL = 0.05
"""Seconds between cancellations of a task that is still running: a lost one is repeated."""


async def stop_task(task: asyncio.Task[Any] | None, what: str, timeout: float = STOP_WAIT) -> bool:
    """Cancel ``task`` (again while it runs on) and wait for it, at most ``timeout`` seconds.

    Returns whether it ended. An error it ended with is logged, not raised: whoever stops it
    wants it gone, and its loop already reported what went wrong.
    """
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            _log.warning("%s did not stop within %gs of cancelling; left behind", what, timeout)
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(remaining, _RECANCEL))
    if not task.cancelled() and (error := task.exception()) is not None:
        _log.warning("%s ended with an error: %r", what, error)
    return True
