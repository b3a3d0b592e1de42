"""An agent's lease on its registry record: register, renew on a heartbeat, release.

Liveness is the lease and nothing else: if the process dies, renewals stop and the server expires
the record after ``ttl`` seconds. If the record vanished while we were cut off (NATS restarted,
or we were away longer than the TTL), the next heartbeat creates it again, so a live agent
always comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agentmesh._tasks import stop_task
from agentmesh.errors import RegistryUnavailable
from agentmesh.models import AgentRecord
from agentmesh.registry.store import RecordConflict, RegistryStore, record_key, record_part
from agentmesh.telemetry.metrics import LEASE_RENEWALS

__all__ = ["Lease"]

_log = logging.getLogger("agentmesh.registry")


class Lease:
    """Keeps one record alive in the registry while its agent runs."""

    def __init__(
        self, store: RegistryStore, record: AgentRecord, *, interval: float, ttl: int
    ) -> None:
        self._store = store
        self.record = record
        self.interval = interval
        self.ttl = ttl
        self._revision: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.renewals = 0
        #: Heartbeats in a row whose renewal failed for want of NATS.
        self.failures = 0

    async def acquire(self) -> None:
        """Register the record and start renewing it."""
        async with self._lock:
            self._revision = await self._store.create(self.record, self.ttl)
        self._task = asyncio.create_task(self._heartbeat(), name=f"lease:{self.record.instance_id}")

    @property
    def reachable(self) -> bool:
        """Whether the registry can be written now (False while NATS is away)."""
        return self._store.connected

    async def update(self, record: AgentRecord) -> None:
        """Publish a changed record (for example ``status="draining"``) at once."""
        self.record = record
        await self._write()

    async def release(self, timeout: float = 10.0) -> bool:
        """Stop renewing and delete the record, so watchers drop it immediately.

        Returns within ``timeout`` seconds, which outlasts a leader election on a cluster (4-9 s
        in nats-server), so an agent stopping during one still deregisters; with NATS gone it
        returns at once.

        Returns False if the registry could not be reached within ``timeout``: the record then
        expires on its own within the lease TTL, so stopping never waits on NATS.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        task, self._task = self._task, None
        await stop_task(task, f"lease renewal of {self.record.instance_id}", timeout)
        # Instance ids change with every start: a released one's label would stay for ever.
        with contextlib.suppress(KeyError):
            LEASE_RENEWALS.remove(self.record.instance_id)
        try:
            async with asyncio.timeout_at(deadline):
                await self._deregister()
        except (RegistryUnavailable, TimeoutError) as exc:
            _log.warning(
                "could not deregister %s (%s); its record expires within %ds",
                self.record.instance_id,
                str(exc) or f"no answer within {timeout:g}s",
                self.ttl,
            )
            return False
        return True

    async def _deregister(self) -> None:
        async with self._lock:
            if self._revision is None:
                return
            revision, self._revision = self._revision, None
            if not self._store.connected:
                raise RegistryUnavailable("NATS is not connected")
            try:
                await self._store.delete(record_key(self.record), revision)
            except RecordConflict:
                # A renewal that timed out (a leader election) may have landed after all: then
                # the record is still ours under a newer revision.
                try:
                    await self._release_current()
                except RecordConflict:
                    _log.warning("record of %s changed before release", self.record.instance_id)

    async def _release_current(self) -> None:
        current = await self._store.get(record_key(self.record))
        ours = record_part(self._store.encode(self.record))  # signed by whichever certificate
        if current is not None and record_part(current[0]) == ours:
            await self._store.delete(record_key(self.record), current[1])

    async def _heartbeat(self) -> None:
        # Until release() takes the task away, not only until cancelled: a cancellation can be
        # lost in a renewal's NATS request (see agentmesh/_tasks.py).
        while self._task is not None:
            await asyncio.sleep(self.interval)
            try:
                await self._write()
            except RegistryUnavailable as exc:
                # Once per outage: NATS away (or closed, credentials revoked) fails every
                # heartbeat alike, and the connection says why.
                level = logging.DEBUG if self.failures else logging.WARNING
                self.failures += 1
                _log.log(level, "lease renewal failed (will retry): %s", exc)
                continue
            except Exception:
                _log.exception("lease renewal failed")
                continue
            if self.failures:
                _log.info(
                    "lease of %s renewed after %d failed renewal(s)",
                    self.record.instance_id,
                    self.failures,
                )
                self.failures = 0

    async def _write(self) -> None:
        async with self._lock:
            if self._revision is None:
                return
            try:
                self._revision = await self._store.renew(self.record, self._revision, self.ttl)
            except RecordConflict:
                self._revision = await self._recover()
            self.renewals += 1
            LEASE_RENEWALS.labels(self.record.instance_id).inc()

    async def _recover(self) -> int:
        """The revision moved: recreate our record if it is gone, else someone else owns it."""
        current = await self._store.get(record_key(self.record))
        if current is None:
            _log.info("record of %s had expired; registering again", self.record.instance_id)
            return await self._store.create(self.record, self.ttl)
        value, revision = current
        if record_part(value) == record_part(self._store.encode(self.record)):
            return revision
        raise RecordConflict(
            f"record of {self.record.instance_id} was overwritten by another writer"
        )
