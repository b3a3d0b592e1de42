"""Access logs: one JSON line per inbound and per outbound call.

In our runtime (``agentmesh run``/``control``), lines go straight to stderr through a buffered sink:
serialised by pydantic-core and written in batches (every 200 ms, at 64 KiB, and at exit) by a
daemon thread, so a call pays a small fraction of what a logging record and a write per line cost
(docs/benchmarks.md). ``AGENTMESH_ACCESS_LOG=false`` turns them off. Embedding applications that do
not use our runtime get the lines on the ``agentmesh.access`` logger instead, to route like any
other log (off unless that logger is enabled for info).
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from typing import Any, BinaryIO

import pydantic_core

__all__ = ["access_logger", "log_call", "setup_access_log"]

access_logger = logging.getLogger("agentmesh.access")
_FLUSH_EVERY = 0.2
_FLUSH_AT = 64 * 1024


class _Sink:
    """Lines gathered in memory and written to ``stream`` in batches."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lines: list[bytes] = []
        self._size = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agentmesh-access-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, line: bytes) -> None:
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            full = self._size >= _FLUSH_AT
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
        if lines:
            try:
                self._stream.write(b"".join(lines))
                self._stream.flush()
            except (OSError, ValueError):
                pass

    def _run(self) -> None:
        while not self._stop.wait(_FLUSH_EVERY):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()


_sink: _Sink | None = None


def log_call(direction: str, **fields: Any) -> None:
    """Emit one access-log line (``direction`` is ``inbound`` or ``outbound``)."""
    sink = _sink
    if sink is None and not access_logger.isEnabledFor(logging.INFO):
        return
    record = {"ts": round(time.time(), 6), "direction": direction, **fields}
    line = pydantic_core.to_json(record)
    if sink is not None:
        sink.write(line + b"\n")
    else:
        access_logger.info(line.decode())


def setup_access_log(enabled: bool) -> None:
    """Runtime wiring: JSON lines on stderr through the buffered sink, or nothing at all."""
    global _sink
    if _sink is not None:
        _sink.close()
        _sink = None
    if enabled:
        _sink = _Sink(sys.stderr.buffer)
