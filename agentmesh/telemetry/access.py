"""Access logs: one JSON line per inbound and per outbound call.

Lines go to the ``agentmesh.access`` logger, so an embedding application routes them like any
other log. Our runtime (``agentmesh run``/``control``) attaches a handler that writes the bare
JSON line to stderr at info level; ``AGENTMESH_ACCESS_LOG=false`` turns them off. The check
``isEnabledFor`` keeps the cost to a few hundred nanoseconds when they are off.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["access_logger", "log_call", "setup_access_log"]

access_logger = logging.getLogger("agentmesh.access")


def log_call(direction: str, **fields: Any) -> None:
    """Emit one access-log line (``direction`` is ``inbound`` or ``outbound``)."""
    if not access_logger.isEnabledFor(logging.INFO):
        return
    record = {"ts": round(time.time(), 6), "direction": direction, **fields}
    access_logger.info(json.dumps(record, separators=(",", ":"), default=str))


def setup_access_log(enabled: bool) -> None:
    """Runtime wiring: bare JSON lines on stderr, or nothing at all."""
    access_logger.propagate = False
    for handler in list(access_logger.handlers):
        access_logger.removeHandler(handler)
    if not enabled:
        access_logger.setLevel(logging.WARNING)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO)
