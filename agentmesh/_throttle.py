"""A warning about dropped things at most once a minute, however fast they are dropped."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

__all__ = ["DropLog"]


class DropLog:
    """Counts drops; warns with the count since the last warning, at most every ``every`` s.

    A flood of refused input must not become a flood of log lines (the log is a buffer too).
    """

    def __init__(
        self,
        log: logging.Logger,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._every = every
        self._clock = clock
        self._count = 0
        self._logged = -math.inf

    def drop(self, message: str, *args: object) -> None:
        """Count one drop; warn ``message % (count, *args)`` if it is time to."""
        self._count += 1
        now = self._clock()
        if now - self._logged >= self._every:
            self._log.warning(message, self._count, *args)
            self._logged, self._count = now, 0
