"""The local, watch-fed view of the registry that every sidecar keeps.

Resolving a capability on the request path is a dictionary lookup in this index: no I/O.
A background task watches the bucket; after every (re)connection it takes a full snapshot and
replaces the index with it, so records that expired while we were away do not linger as ghosts.
While NATS is gone, the last view stays in place: the data plane keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable, KeysView
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version
from pydantic import ValidationError

from agentmesh.errors import InvalidInput, RegistryUnavailable
from agentmesh.models import AgentRecord, CapabilityOffer, CapabilitySpec
from agentmesh.registry.connection import NatsConnection
from agentmesh.registry.follow import BucketFollower
from agentmesh.registry.store import RegistryStore, instance_of, record_key, record_part
from agentmesh.telemetry.metrics import REGISTRY_INSTANCES

if TYPE_CHECKING:
    from agentmesh.security.signed import StateTrust

__all__ = ["LocalIndex", "Target", "parse_specifier"]

_log = logging.getLogger("agentmesh.registry")
#: Refused values remembered per key (cleared when full): bounds what a flood of them costs.
_REFUSED_MEMORY = 10_000


@dataclass(frozen=True, slots=True)
class Target:
    """One capability of one live instance: what the balancer chooses among.

    ``instance_id`` and ``serving`` are copied from the record when the index is built, so the
    balancer's random draws read this object alone, not the record (a record change makes a new
    Target).
    """

    record: AgentRecord
    spec: CapabilitySpec
    version: Version
    instance_id: str = field(init=False, repr=False, compare=False)
    serving: bool = field(init=False, repr=False, compare=False)
    """The record's status is ``serving``: new calls may go here."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "instance_id", self.record.instance_id)
        object.__setattr__(self, "serving", self.record.status == "serving")

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


@functools.lru_cache(maxsize=1024)
def _version(text: str) -> Version:
    """``Version(text)``, parsed once per distinct string (a Version is immutable).

    Most instances share a few versions; parsing 10,000 again on every rebuild showed.
    """
    return Version(text)


def _target(record: AgentRecord, spec: CapabilitySpec) -> Target:
    return Target(record, spec, _version(spec.version))


def _by_instance(target: Target) -> str:
    return target.instance_id


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

    def __init__(self, trust: StateTrust | None = None) -> None:
        #: Decides which records are taken (signed by the agent they name); None with mTLS
        #: off, where records are taken as read (see docs/security.md).
        self.trust = trust
        self._records: dict[str, AgentRecord] = {}
        self._raw: dict[str, bytes] = {}
        #: Values refused (and logged) once, so a renewal of the same bytes is not logged again.
        self._refused: dict[str, bytes] = {}
        self._by_capability: dict[str, tuple[Target, ...]] = {}
        self.synced = asyncio.Event()
        self.revision = 0
        self._listeners: list[Callable[[], None]] = []
        self._follower: BucketFollower | None = None

    # ---- queries (no I/O) -------------------------------------------------------------------

    def targets(self, capability: str) -> tuple[Target, ...]:
        """Every live instance offering ``capability``, draining ones included.

        The same tuple until ``capability`` changes, a new one after (callers cache by it).
        """
        return self._by_capability.get(capability, ())

    def records(self) -> list[AgentRecord]:
        return sorted(self._records.values(), key=lambda r: (r.name, r.instance_id))

    def instance_ids(self) -> KeysView[str]:
        """The live instance ids, unsorted: a cheap membership view for per-change syncing."""
        return self._records.keys()

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
        """One watch event under a registry key: a value (put) or None (delete, purge, expiry).

        Kept by instance id (the key is ``<name>.<instance>``, see ``registry/store.py``).
        """
        instance = instance_of(key)
        if instance is None:
            _log.warning("ignoring registry key %r (not <agent name>.<instance id>)", key)
            return
        current = self._records.get(instance)
        if current is not None and record_key(current) != key:
            # Another agent's key claiming a live instance id: never lets it take that over.
            _log.warning(
                "ignoring %r: instance %r is registered by %s", key, instance, current.name
            )
            return
        if value is None:
            self._refused.pop(key, None)
            gone = self._records.pop(instance, None)
            if gone is not None:
                self._raw.pop(instance, None)
                self._update(instance, gone, None)
            return
        if self._raw.get(instance) == value or self._refused.get(key) == value:
            return
        record = self._decode(key, value)
        if record is None:
            if len(self._refused) >= _REFUSED_MEMORY:
                self._refused.clear()
            self._refused[key] = value  # logged once, not at every lease renewal
            return
        self._refused.pop(key, None)
        self._raw[instance] = value
        self._records[instance] = record
        self._update(instance, current, record)

    def replace(self, snapshot: dict[str, bytes]) -> None:
        """Swap the whole index for a fresh snapshot (after a (re)connection)."""
        records: dict[str, AgentRecord] = {}
        raw: dict[str, bytes] = {}
        refused: dict[str, bytes] = {}
        for key, value in snapshot.items():
            instance = instance_of(key)
            if instance is None or instance in records:
                continue
            if self._refused.get(key) == value:
                refused[key] = value
                continue
            record = self._records.get(instance) if self._raw.get(instance) == value else None
            record = record or self._decode(key, value)
            if record is not None:
                records[instance], raw[instance] = record, value
            else:
                refused[key] = value
        self._records, self._raw, self._refused = records, raw, refused
        self._rebuild()

    def _decode(self, key: str, value: bytes) -> AgentRecord | None:
        """The record under ``key``, or None (logged) if it is malformed or not to be trusted."""
        if self.trust is not None:
            try:
                record = self.trust.record(key, value)
            except ValueError as exc:
                _log.warning("ignoring registry record %r: %s", key, exc)
                return None
        else:
            try:
                record = AgentRecord.model_validate_json(record_part(value))
            except ValidationError as exc:
                _log.warning("ignoring malformed registry record %r: %s", key, exc.errors()[:3])
                return None
        if record_key(record) != key:
            _log.warning(
                "ignoring record under %r claiming %s instance %r",
                key,
                record.name,
                record.instance_id,
            )
            return None
        return record

    def _update(self, key: str, old: AgentRecord | None, new: AgentRecord | None) -> None:
        """Rebuild only the capabilities that one instance's record offered or offers.

        A watch event changes one record; rebuilding every capability from every record cost
        tens of milliseconds per event with 10,000 records.
        """
        names = {s.name for r in (old, new) if r is not None for s in r.capabilities}
        by_capability = dict(self._by_capability)
        for name in names:
            targets = [t for t in by_capability.get(name, ()) if t.instance_id != key]
            if new is not None:
                targets += [_target(new, s) for s in new.capabilities if s.name == name]
            if targets:
                by_capability[name] = tuple(sorted(targets, key=_by_instance))
            else:
                by_capability.pop(name, None)
        self._by_capability = by_capability
        self._changed()

    def _rebuild(self) -> None:
        by_capability: dict[str, list[Target]] = {}
        for record in self._records.values():
            for spec in record.capabilities:
                by_capability.setdefault(spec.name, []).append(_target(record, spec))
        self._by_capability = {
            name: tuple(sorted(ts, key=_by_instance)) for name, ts in by_capability.items()
        }
        self._changed()

    def _changed(self) -> None:
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
            stored=store.stored,
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
