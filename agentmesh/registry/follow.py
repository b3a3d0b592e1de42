"""Following a KV bucket: a full snapshot first, then every change, resynchronised on reconnect.

The registry index, the policy cache and the security view keep an in-memory view of a bucket
that must never keep ghosts: after every (re)connection the watch is restarted and the view
replaced by a fresh snapshot; while NATS is away the last view stays. One implementation, shared.

nats-py marks the end of the initial values with ``None`` when the consumer has nothing left to
deliver *and* its callback has seen nothing yet, which is also true while the values still sit in
the client's buffers (seen under load: a fresh CLI's index empty while the registry was not). So
an early marker with nothing read is checked against the stream (``stored``); if it holds
values, the view waits for the entry whose ``delta`` (messages still pending) is 0, at most
``_EARLY_MARKER_WAIT`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agentmesh._tasks import STOP_WAIT, stop_task
from agentmesh.registry.connection import NatsConnection

__all__ = ["BucketFollower"]

_log = logging.getLogger("agentmesh.registry")

#: How long an early end-of-values marker may hold back the first view: the values it hid are
#: already in this process's buffers, so they arrive within a scheduling hiccup, not a round trip.
_EARLY_MARKER_WAIT = 2.0


class BucketFollower:
    """Feeds ``replace(snapshot)`` once per (re)connection, then ``apply(key, value|None)``;
    sets ``synced`` after the first full view."""

    def __init__(
        self,
        what: str,
        open_watch: Callable[[], Awaitable[Any]],
        *,
        replace: Callable[[dict[str, bytes]], None],
        apply: Callable[[str, bytes | None], None],
        synced: asyncio.Event,
        stored: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.what = what
        self._open_watch = open_watch
        self._stored = stored
        self._replace = replace
        self._apply = apply
        self.synced = synced
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None

    def start(self, conn: NatsConnection) -> None:
        conn.on_reconnect(self._stop_watcher)
        self._task = asyncio.create_task(self._run(), name=f"watch:{self.what}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task, f"{self.what} watch")
        await self._stop_watcher()

    async def _stop_watcher(self) -> None:
        """Ends the current watch; the run loop starts a new one from a snapshot."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            # Bounded: the unsubscribe waits its turn in nats-py's write queue.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_WAIT):
                    await watcher.stop()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                self._watcher = watcher = await self._open_watch()
                await self._consume(watcher)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("%s watch interrupted (%s); retrying", self.what, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _consume(self, watcher: Any) -> None:
        snapshot: dict[str, bytes] | None = {}
        held: asyncio.TimerHandle | None = None

        def settle() -> None:
            nonlocal snapshot
            if snapshot is not None:
                self._synced(snapshot)
                snapshot = None

        try:
            async for entry in watcher:
                if entry is None:
                    if snapshot is not None and held is None:
                        if snapshot or not await self._has_values():
                            settle()
                        else:
                            held = asyncio.get_running_loop().call_later(_EARLY_MARKER_WAIT, settle)
                    continue
                value = None if entry.operation in ("DEL", "PURGE") else (entry.value or b"")
                if snapshot is None:
                    self._apply(entry.key, value)
                    continue
                if value is None:
                    snapshot.pop(entry.key, None)
                else:
                    snapshot[entry.key] = value
                if entry.delta == 0:
                    settle()
        finally:
            if held is not None:
                held.cancel()

    async def _has_values(self) -> bool:
        """Whether the stream holds values the early marker may have hidden (False if unknown)."""
        if self._stored is None:
            return False
        try:
            return await self._stored()
        except Exception as exc:
            _log.debug("%s: cannot check the stream after an early marker (%s)", self.what, exc)
            return False

    def _synced(self, snapshot: dict[str, bytes]) -> None:
        self._replace(snapshot)
        self.synced.set()
