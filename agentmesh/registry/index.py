"""The local, watch-fed view of the registry that every sidecar keeps.

Resolving a capability on the request path is a dictionary lookup in this index: no I/O.
A background task watches the bucket; after every (re)connection it takes a full snapshot and
replaces the index with it, so records that expired while we were away do not linger as ghosts.
While NATS is gone, the last view stays in place: the data plane keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version
from pydantic import ValidationError

from agentmesh.errors import InvalidInput, RegistryUnavailable
from agentmesh.models import AgentRecord, CapabilityOffer, CapabilitySpec
from agentmesh.registry.connection import NatsConnection
from agentmesh.registry.follow import BucketFollower
from agentmesh.registry.store import RegistryStore
from agentmesh.telemetry.metrics import REGISTRY_INSTANCES

__all__ = ["LocalIndex", "Target", "parse_specifier"]

_log = logging.getLogger("agentmesh.registry")


@dataclass(frozen=True, slots=True)
class Target:
    """One capability of one live instance: what the balancer chooses among."""

    record: AgentRecord
    spec: CapabilitySpec
    version: Version

    @property
    def instance_id(self) -> str:
        return self.record.instance_id

    @property
    def url(self) -> str:
        return self.record.endpoint

    def offer(self) -> CapabilityOffer:
        return CapabilityOffer(
            capability=self.spec,
            agent=self.record.name,
            instance_id=self.record.instance_id,
            endpoint=self.record.endpoint,
            agent_version=self.record.version,
            labels=self.record.labels,
            status=self.record.status,
        )


def parse_specifier(version: str | None) -> SpecifierSet | None:
    """``">=1.0,<2"`` → SpecifierSet; a bare ``"1.2.0"`` means ``==1.2.0``."""
    if not version:
        return None
    text = version.strip()
    if text[0].isdigit():
        text = f"=={text}"
    try:
        return SpecifierSet(text)
    except InvalidSpecifier as exc:
        raise InvalidInput(f"version constraint {version!r} is not a PEP 440 specifier") from exc


def matches(
    target: Target,
    specifier: SpecifierSet | None,
    tags: Iterable[str] | None,
    labels: dict[str, str] | None,
) -> bool:
    if specifier is not None and not specifier.contains(target.version, prereleases=True):
        return False
    if tags and not set(tags).issubset(target.spec.tags):
        return False
    return not labels or all(target.record.labels.get(k) == v for k, v in labels.items())


class LocalIndex:
    """capability name → live targets, kept current by a watch on the registry bucket."""

    def __init__(self) -> None:
        self._records: dict[str, AgentRecord] = {}
        self._raw: dict[str, bytes] = {}
        self._by_capability: dict[str, tuple[Target, ...]] = {}
        self.synced = asyncio.Event()
        self.revision = 0
        self._listeners: list[Callable[[], None]] = []
        self._follower: BucketFollower | None = None

    # ---- queries (no I/O) -------------------------------------------------------------------

    def targets(self, capability: str) -> tuple[Target, ...]:
        """Every live instance offering ``capability``, draining ones included."""
        return self._by_capability.get(capability, ())

    def records(self) -> list[AgentRecord]:
        return sorted(self._records.values(), key=lambda r: (r.name, r.instance_id))

    def capabilities(self) -> list[str]:
        return sorted(self._by_capability)

    def find(
        self,
        capability: str | None = None,
        *,
        version: str | None = None,
        tags: Iterable[str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[CapabilityOffer]:
        specifier = parse_specifier(version)
        names = [capability] if capability else self.capabilities()
        return [
            t.offer()
            for name in names
            for t in self.targets(name)
            if matches(t, specifier, tags, labels)
        ]

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every change (the sidecar prunes endpoint state with it)."""
        self._listeners.append(listener)

    # ---- feeding -------------------------------------------------------------------------------

    def apply(self, key: str, value: bytes | None) -> None:
        """One watch event: a value (put) or None (delete, purge, expiry)."""
        if value is None:
            if self._records.pop(key, None) is not None:
                self._raw.pop(key, None)
                self._rebuild()
            return
        if self._raw.get(key) == value:
            return
        record = self._decode(key, value)
        if record is None:
            return
        self._raw[key] = value
        self._records[key] = record
        self._rebuild()

    def replace(self, snapshot: dict[str, bytes]) -> None:
        """Swap the whole index for a fresh snapshot (after a (re)connection)."""
        records: dict[str, AgentRecord] = {}
        raw: dict[str, bytes] = {}
        for key, value in snapshot.items():
            record = self._records.get(key) if self._raw.get(key) == value else None
            record = record or self._decode(key, value)
            if record is not None:
                records[key], raw[key] = record, value
        self._records, self._raw = records, raw
        self._rebuild()

    @staticmethod
    def _decode(key: str, value: bytes) -> AgentRecord | None:
        try:
            record = AgentRecord.model_validate_json(value)
        except ValidationError as exc:
            _log.warning("ignoring malformed registry record %r: %s", key, exc.errors()[:3])
            return None
        if record.instance_id != key:
            _log.warning("ignoring record under %r claiming instance %r", key, record.instance_id)
            return None
        return record

    def _rebuild(self) -> None:
        by_capability: dict[str, list[Target]] = {}
        for record in self._records.values():
            for spec in record.capabilities:
                target = Target(record, spec, Version(spec.version))
                by_capability.setdefault(spec.name, []).append(target)
        self._by_capability = {
            name: tuple(sorted(ts, key=lambda t: t.instance_id))
            for name, ts in by_capability.items()
        }
        self.revision += 1
        REGISTRY_INSTANCES.set(len(self._records))
        for listener in self._listeners:
            listener()

    # ---- the watch task ------------------------------------------------------------------------

    def start(self, store: RegistryStore, conn: NatsConnection) -> None:
        self._follower = BucketFollower(
            f"registry bucket {store.bucket!r}",
            store.watch,
            replace=self.replace,
            apply=self.apply,
            synced=self.synced,
        )
        self._follower.start(conn)

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()

    async def wait_synced(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.synced.wait(), timeout)
        except TimeoutError as exc:
            raise RegistryUnavailable(
                f"registry did not deliver its initial view within {timeout:g}s"
            ) from exc
