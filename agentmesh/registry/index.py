"""The local, watch-fed view of the registry that every sidecar keeps.

Resolving a capability on the request path is a dictionary lookup in this index: no I/O.
A background task watches the bucket; after every (re)connection it takes a full snapshot and
replaces the index with it, so records that expired while we were away do not linger as ghosts.
While NATS is gone, the last view stays in place: the data plane keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Callable, Iterable, KeysView
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version
from pydantic import ValidationError

from agentmesh._tasks import stop_task
from agentmesh._throttle import DropLog
from agentmesh.errors import InvalidInput, RegistryUnavailable
from agentmesh.models import AgentRecord, CapabilityOffer, CapabilitySpec
from agentmesh.registry.connection import NatsConnection
from agentmesh.registry.follow import BucketFollower
from agentmesh.registry.store import RegistryStore, instance_of, record_key, record_part
from agentmesh.registry.unverified import Unverified, Waiting
from agentmesh.settings import Settings
from agentmesh.telemetry.metrics import REGISTRY_INSTANCES, REGISTRY_OVER_CAP

if TYPE_CHECKING:
    from agentmesh.security.signed import StateTrust

__all__ = ["LocalIndex", "Target", "parse_specifier"]

_log = logging.getLogger("agentmesh.registry")
#: Refused values remembered per key (cleared when full): bounds what a flood of them costs.
_REFUSED_MEMORY = 10_000


def _digest(value: bytes) -> bytes:
    """What a refused value is remembered by (16 bytes, whatever its size)."""
    return hashlib.blake2b(value, digest_size=16).digest()


#: One instance's record before and after a change (None: absent).
_Change = tuple[str, AgentRecord | None, AgentRecord | None]


def _setting(name: str) -> int:
    """A setting's default: an index made without a sidecar's settings (tests, benchmarks)."""
    default = Settings.model_fields[name].default
    assert isinstance(default, int)
    return default


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
    """capability name → live targets, kept current by a watch on the registry bucket.

    Holds only records it has verified (``trust``). Once its watch runs, the signed records of a
    snapshot first wait unverified (``registry/unverified.py``) and are verified before anything
    uses them: the ones a call resolves or a policy decision looks up, at that moment, a
    ``verify_batch`` at a time; the rest by a background task, a batch per event-loop turn. A
    record verified earlier stays in force until the value replacing it verifies.
    """

    def __init__(
        self,
        trust: StateTrust | None = None,
        *,
        verify_batch: int = _setting("registry_verify_batch"),
        unverified_bytes: int = _setting("registry_unverified_bytes"),
        max_instances_per_agent: int = _setting("registry_max_instances_per_agent"),
    ) -> None:
        #: Decides which records are taken (signed by the agent they name); None with mTLS
        #: off, where records are taken as read (see docs/security.md).
        self.trust = trust
        self._records: dict[str, AgentRecord] = {}
        self._raw: dict[str, bytes] = {}
        #: Digests of values refused (and logged) once, so a renewal of the same bytes is not
        #: logged again; digests, not values, so the memory stays small whatever the values.
        self._refused: dict[str, bytes] = {}
        self._by_capability: dict[str, tuple[Target, ...]] = {}
        #: Verified instances per agent name, against ``max_instances_per_agent``.
        self._per_agent: dict[str, int] = {}
        self.max_instances_per_agent = max_instances_per_agent
        self._over_cap = DropLog(_log)
        self._unverified = Unverified(unverified_bytes)
        self._verify_batch = verify_batch
        #: True while verifying or telling listeners: a resolution then (a listener's) answers
        #: from what is verified, and starts no verification inside another.
        self._settling = False
        self.synced = asyncio.Event()
        #: Set while no record waits unverified (after the first view: everything in it checked).
        self.verified = asyncio.Event()
        self._work = asyncio.Event()
        self.revision = 0
        self._listeners: list[Callable[[], None]] = []
        self._follower: BucketFollower | None = None
        self._verifier: asyncio.Task[None] | None = None

    # ---- queries (no I/O) -------------------------------------------------------------------

    def targets(self, capability: str) -> tuple[Target, ...]:
        """Every live instance offering ``capability``, draining ones included.

        Verifies up to ``verify_batch`` of the records still waiting with ``capability`` first
        (a new sidecar's first calls), so a call never waits on the whole registry.
        The same tuple until ``capability`` changes, a new one after (callers cache by it).
        """
        if capability in self._unverified.by_capability and not self._settling:
            self._settle(self._unverified.offering(capability, self._verify_batch))
        return self._by_capability.get(capability, ())

    def records(self) -> list[AgentRecord]:
        """Every verified instance (``verified`` says whether some still wait)."""
        return sorted(self._records.values(), key=lambda r: (r.name, r.instance_id))

    def records_named(self, name: str) -> list[AgentRecord]:
        """Every instance of agent ``name``, its waiting records verified first.

        For decisions that depend on all of them (a caller's labels in a policy): a record not
        yet verified would otherwise be a label silently missing, and a deny rule missed. So it
        verifies even when asked from a listener.
        """
        waiting = self._unverified.named(name)
        if waiting:
            self._settle(waiting)
        return [r for r in self._records.values() if r.name == name]

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
        Verified as it comes (one record): only a snapshot's records wait.
        """
        instance = instance_of(key)
        if instance is None:
            _log.warning("ignoring registry key %r (not <agent name>.<instance id>)", key)
            return
        waiting = self._unverified.entries.get(instance)
        if waiting is not None:
            if waiting.key == key and waiting.value == value:
                return  # a renewal of the bytes already waiting
            if waiting.key == key and value is None:
                self._unverified.pop(instance)  # never shown: nothing to undo
                self._check_verified()
            else:
                self._settle([instance])  # decide what holds the instance before this event
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
                self._update([(instance, gone, None)])
            return
        if self._raw.get(instance) == value or self._was_refused(key, value):
            return
        if current is None and self._full(key, self._held(_agent_of(key))):
            return
        record = self._decode(key, value)
        if record is None:
            self._remember_refused(key, value)
            return
        self._refused.pop(key, None)
        self._raw[instance] = value
        self._records[instance] = record
        self._update([(instance, current, record)])

    def replace(self, snapshot: dict[str, bytes]) -> None:
        """Swap the whole index for a fresh snapshot (after a (re)connection).

        With a verifier running, signed values not already verified wait for it; a record
        verified before keeps its key's place until the value that replaces it verifies.
        """
        records: dict[str, AgentRecord] = {}
        raw: dict[str, bytes] = {}
        refused: dict[str, bytes] = {}
        before = self._unverified.entries
        self._unverified = waiting = Unverified(self._unverified.limit_bytes)
        admitted: dict[str, int] = {}  # instances per agent name taken or waiting, for the cap
        for key, value in snapshot.items():
            instance = instance_of(key)
            if instance is None or instance in records:
                continue
            if instance not in waiting.entries:
                name = _agent_of(key)
                if self._full(key, admitted.get(name, 0)):
                    continue
                admitted[name] = admitted.get(name, 0) + 1
            rival = waiting.pop(instance)
            if rival is not None:
                # Two keys claim one instance (a forger's doing): the first that verifies holds
                # it, as when every value was verified on arrival.
                record = self._decode(rival.key, rival.value)
                if record is not None:
                    records[instance], raw[instance] = record, rival.value
                    continue
                refused[rival.key] = _digest(rival.value)
            old = self._records.get(instance)
            if old is not None and record_key(old) == key:
                records[instance], raw[instance] = old, self._raw[instance]
                if self._raw[instance] == value:
                    continue
            if self._was_refused(key, value):
                refused[key] = self._refused[key]
                continue
            held = before.get(instance)
            if held is None or held.key != key or held.value != value:
                held = None
                if self._may_wait(value):
                    claim = self._claim(key, value)
                    if claim is None:
                        refused[key] = _digest(value)
                        continue
                    held = Waiting(key, value, claim)
            if held is not None and waiting.add(instance, held):
                continue
            record = self._decode(key, value)
            if record is not None:
                records[instance], raw[instance] = record, value
            else:
                refused[key] = _digest(value)
        self._records, self._raw, self._refused = records, raw, refused
        self._rebuild()
        self._check_verified()

    def _may_wait(self, value: bytes) -> bool:
        """Whether ``value`` may wait for the verifier: signed (else it is checked at once,
        cheaply) and a verifier is running to finish it."""
        return self._verifier is not None and len(record_part(value)) != len(value)

    def _claim(self, key: str, value: bytes) -> AgentRecord | None:
        """The record ``value`` claims to be, unverified: enough to know what it is about."""
        try:
            record = AgentRecord.model_validate_json(record_part(value))
        except ValidationError as exc:
            _log.warning("ignoring malformed registry record %r: %s", key, exc.errors()[:3])
            return None
        return self._under_own_key(key, record)

    def _decode(
        self, key: str, value: bytes, claim: AgentRecord | None = None
    ) -> AgentRecord | None:
        """The record under ``key``, or None (logged) if it is malformed or not to be trusted.

        ``claim``: the record already parsed from ``value`` (a waiting one), not parsed again.
        """
        if self.trust is None:
            return self._claim(key, value)
        try:
            record = self.trust.record(key, value, claim)
        except ValueError as exc:
            _log.warning("ignoring registry record %r: %s", key, exc)
            return None
        return self._under_own_key(key, record)

    def _under_own_key(self, key: str, record: AgentRecord) -> AgentRecord | None:
        if record_key(record) != key:
            _log.warning(
                "ignoring record under %r claiming %s instance %r",
                key,
                record.name,
                record.instance_id,
            )
            return None
        return record

    def _held(self, name: str) -> int:
        """Instances of agent ``name`` in the index, verified or waiting."""
        return self._per_agent.get(name, 0) + self._unverified.count_named(name)

    def _full(self, key: str, held: int) -> bool:
        """Whether a new instance under ``key`` is past its agent's cap (then counted, logged)."""
        if held < self.max_instances_per_agent:
            return False
        REGISTRY_OVER_CAP.inc()
        self._over_cap.drop(
            "ignored %d registry record(s) (last %r): agent %r has %d instances, the cap "
            "(AGENTMESH_REGISTRY_MAX_INSTANCES_PER_AGENT)",
            key,
            _agent_of(key),
            self.max_instances_per_agent,
        )
        return True

    def _was_refused(self, key: str, value: bytes) -> bool:
        return key in self._refused and self._refused[key] == _digest(value)

    def _remember_refused(self, key: str, value: bytes) -> None:
        if len(self._refused) >= _REFUSED_MEMORY:
            self._refused.clear()
        self._refused[key] = _digest(value)  # logged once, not at every lease renewal

    def _settle(self, instances: Iterable[str]) -> None:
        """Verify these waiting records now; the good ones enter the index in one update.

        One that fails is logged and remembered as refused; a record verified before under
        its key stays (a bad value never evicts a good record).
        """
        settling, self._settling = self._settling, True
        try:
            changes: list[_Change] = []
            for instance in instances:
                waiting = self._unverified.pop(instance)
                if waiting is None:
                    continue
                try:
                    record = self._decode(waiting.key, waiting.value, waiting.claim)
                except Exception:  # a bug, not a refusal: refuse it all the same, loudly
                    _log.exception("could not verify registry record %r", waiting.key)
                    record = None
                if record is None:
                    self._remember_refused(waiting.key, waiting.value)
                    continue
                self._refused.pop(waiting.key, None)
                changes.append((instance, self._records.get(instance), record))
                self._records[instance], self._raw[instance] = record, waiting.value
            if changes:
                self._update(changes)
        finally:
            self._settling = settling
        self._check_verified()

    def _check_verified(self) -> None:
        if self._unverified.entries:
            self.verified.clear()
            self._work.set()
        else:
            self.verified.set()

    def _update(self, changes: list[_Change]) -> None:
        """Rebuild only the capabilities that these instances' records offered or offer.

        A watch event changes one record; rebuilding every capability from every record cost
        tens of milliseconds per event with 10,000 records. A batch of newly verified records
        (no old ones) only adds targets.
        """
        by_capability = dict(self._by_capability)
        added: dict[str, list[Target]] = {}
        for _, old, new in changes:
            if old is not None:
                left = self._per_agent[old.name] - 1
                if left:
                    self._per_agent[old.name] = left
                else:
                    del self._per_agent[old.name]
            if new is not None:
                self._per_agent[new.name] = self._per_agent.get(new.name, 0) + 1
                for spec in new.capabilities:
                    added.setdefault(spec.name, []).append(_target(new, spec))
        stale = {s.name for _, old, _ in changes if old is not None for s in old.capabilities}
        changed = {instance for instance, old, _ in changes if old is not None}
        for name in stale | added.keys():
            targets = list(by_capability.get(name, ()))
            if name in stale:
                targets = [t for t in targets if t.instance_id not in changed]
            targets += added.get(name, ())
            if targets:
                by_capability[name] = tuple(sorted(targets, key=_by_instance))
            else:
                by_capability.pop(name, None)
        self._by_capability = by_capability
        self._changed()

    def _rebuild(self) -> None:
        by_capability: dict[str, list[Target]] = {}
        self._per_agent = {}
        for record in self._records.values():
            self._per_agent[record.name] = self._per_agent.get(record.name, 0) + 1
            for spec in record.capabilities:
                by_capability.setdefault(spec.name, []).append(_target(record, spec))
        self._by_capability = {
            name: tuple(sorted(ts, key=_by_instance)) for name, ts in by_capability.items()
        }
        self._changed()

    def _changed(self) -> None:
        self.revision += 1
        REGISTRY_INSTANCES.set(len(self._records))
        settling, self._settling = self._settling, True
        try:
            for listener in self._listeners:
                listener()
        finally:
            self._settling = settling

    # ---- the watch task and the verifier -------------------------------------------------------

    def start(self, store: RegistryStore, conn: NatsConnection) -> None:
        if self.trust is not None:
            self._verifier = asyncio.create_task(self._verify(), name="registry-verifier")
        self._follower = BucketFollower(
            f"registry bucket {store.bucket!r}",
            store.watch,
            replace=self.replace,
            apply=self.apply,
            synced=self.synced,
            stored=store.stored,
        )
        self._follower.start(conn)

    async def _verify(self) -> None:
        """Works through the waiting records, one batch per event-loop turn."""
        while True:
            await self._work.wait()
            while self._unverified.entries:
                self._settle(self._unverified.oldest(self._verify_batch))
                await asyncio.sleep(0)
            self._work.clear()

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()
        verifier, self._verifier = self._verifier, None
        await stop_task(verifier, "registry record verification")

    async def wait_synced(self, timeout: float) -> None:
        await _within(
            self.synced,
            timeout,
            lambda: f"registry did not deliver its initial view within {timeout:g}s",
        )

    async def wait_verified(self, timeout: float) -> None:
        """Until the first view is in and every record in it verified (listings wait for it)."""
        await self.wait_synced(timeout)
        await _within(
            self.verified,
            timeout,
            lambda: (
                f"registry: {len(self._unverified)} records still unverified after {timeout:g}s"
            ),
        )


def _agent_of(key: str) -> str:
    """The agent name in a registry key (a record lives under its own name, ``record_key``)."""
    return key.partition(".")[0]


async def _within(event: asyncio.Event, timeout: float, failure: Callable[[], str]) -> None:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError as exc:
        raise RegistryUnavailable(failure()) from exc
