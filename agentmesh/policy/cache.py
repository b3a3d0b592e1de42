"""The sidecar's local, watch-fed copy of the policies, compiled for the request path.

Like the registry index (``registry/index.py``): a background task watches the policy bucket;
after every (re)connection it takes a full snapshot and replaces the compiled state with it, so a
policy deleted while we were away does not linger. While NATS or the control plane is gone, the
last good state stays in force. Every change recompiles one immutable :class:`PolicySnapshot`
and swaps it in; decisions on the request path read it without I/O or locks.

A stored value that is not a valid policy never crashes anything: it is logged and compiled
into an :class:`InvalidPolicy` that denies what it would cover (fails closed).

With mTLS on, what is enforced is what the control plane signed: :meth:`PolicyCache._take_set`
is the one place that decides whether a policy set came from it (``security/signed.py``), and
a stored policy counts only if its bytes have the hash that set lists. A key added, altered or
deleted around the control plane is logged and changes nothing (the last signed copy of each
policy is kept); an unsigned or older set is logged and ignored. A listed policy whose signed
bytes this sidecar never saw (deleted from NATS before it started) fails closed until the
control plane writes it back, and so does everything when policies are stored but no signed set
is, at a (re)synchronisation. With mTLS off there are no roots to check a signature with, and
every stored policy is taken as read (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from agentmesh._config import BreakerConfig, RetryPolicy
from agentmesh.errors import RegistryUnavailable
from agentmesh.models import CAPABILITY_NAME_PATTERN, AccessPolicy, PolicySet, TrafficPolicy
from agentmesh.policy.access import (
    AccessEngine,
    Caller,
    Decision,
    DefaultAction,
    InvalidPolicy,
    Subject,
)
from agentmesh.policy.manifest import error_listing, parse_policy
from agentmesh.policy.store import SET_KEY, PolicyStore, policy_digest
from agentmesh.policy.traffic import TrafficRule, compile_traffic
from agentmesh.registry.connection import NatsConnection
from agentmesh.registry.follow import BucketFollower
from agentmesh.registry.index import LocalIndex

if TYPE_CHECKING:
    from agentmesh.security.signed import StateTrust

__all__ = ["PolicyCache", "PolicySnapshot", "compile_snapshot"]

_log = logging.getLogger("agentmesh.policy")
#: Cached decisions (and caller label sets) before the cache starts over.
_DECISION_CACHE = 4096


def _covers(data: Any) -> frozenset[str] | None:
    """The capabilities an invalid manifest names, if that can be told for certain."""
    import re

    spec = data.get("spec") if isinstance(data, dict) else None
    if not isinstance(spec, dict):
        return None
    name_ok = re.compile(CAPABILITY_NAME_PATTERN).match
    kind = data.get("kind")
    if kind == "TrafficPolicy":
        cap = spec.get("capability")
        return frozenset([cap]) if isinstance(cap, str) and name_ok(cap) else None
    if kind != "AccessPolicy" or not isinstance(spec.get("rules"), list):
        return None
    names: set[str] = set()
    for rule in spec["rules"]:
        targets = rule.get("targets") if isinstance(rule, dict) else None
        if not isinstance(targets, list) or not targets:
            return None
        for target in targets:
            cap = target.get("capability") if isinstance(target, dict) else None
            if not isinstance(cap, str) or not name_ok(cap):
                return None
            names.add(cap)
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """Everything compiled from one state of the bucket."""

    policies: Mapping[str, AccessPolicy | TrafficPolicy]
    access: AccessEngine
    traffic: Mapping[str, TrafficRule]
    invalid: tuple[InvalidPolicy, ...] = field(default=())


def compile_snapshot(
    raw: Mapping[str, bytes],
    *,
    default: DefaultAction = "allow",
    retry: RetryPolicy | None = None,
    breaker: BreakerConfig | None = None,
    missing: Iterable[str] = (),
) -> PolicySnapshot:
    """Compile stored values (key → bytes); never raises for what is stored.

    ``missing``: policies in force whose content is unknown; they fail closed on everything.
    """
    policies: dict[str, AccessPolicy | TrafficPolicy] = {}
    invalid: list[InvalidPolicy] = [
        InvalidPolicy(
            name,
            None,
            None,
            "it is in the signed policy set, but its signed content is neither in NATS nor "
            "known to this sidecar (deleted or altered around the control plane)",
        )
        for name in missing
    ]
    traffic: dict[str, TrafficRule] = {}
    for key in sorted(raw):
        value = raw[key]
        try:
            data = json.loads(value)
        except ValueError as exc:
            invalid.append(InvalidPolicy(key, None, None, f"not JSON: {exc}"))
            continue
        kind = data.get("kind") if isinstance(data, dict) else None
        kind = kind if isinstance(kind, str) else None
        try:
            policy = parse_policy(data)
        except ValidationError as exc:
            invalid.append(InvalidPolicy(key, kind, _covers(data), error_listing(exc)))
            continue
        if policy.metadata.name != key:
            problem = f"stored under {key!r} but named {policy.metadata.name!r}"
            invalid.append(InvalidPolicy(key, kind, _covers(data), problem))
            continue
        if isinstance(policy, TrafficPolicy):
            capability = policy.spec.capability
            try:
                rule = compile_traffic(policy, retry=retry, breaker=breaker)
            except ValueError as exc:
                invalid.append(InvalidPolicy(key, kind, frozenset([capability]), str(exc)))
                continue
            if capability in traffic:
                _log.warning(
                    "TrafficPolicy %r ignored: %r already applies to capability %r",
                    key,
                    traffic[capability].policy,
                    capability,
                )
                continue
            traffic[capability] = rule
        policies[key] = policy
    for bad in invalid:
        _log.warning("invalid %s %r fails closed: %s", bad.kind or "policy", bad.name, bad.problem)
    access = AccessEngine(
        (p for p in policies.values() if isinstance(p, AccessPolicy)), invalid, default=default
    )
    return PolicySnapshot(policies, access, traffic, tuple(invalid))


class PolicyCache:
    """The compiled policies this sidecar enforces, kept current by a watch on the bucket."""

    def __init__(
        self,
        store: PolicyStore,
        index: LocalIndex,
        *,
        default: DefaultAction = "allow",
        retry: RetryPolicy | None = None,
        breaker: BreakerConfig | None = None,
        trust: StateTrust | None = None,
    ) -> None:
        self.store = store
        self._trust = trust
        #: The signed policy set in force (mTLS on), its version and bytes.
        self.policy_set: PolicySet | None = None
        self.set_version = 0
        self._set_bytes: bytes | None = None
        #: Per listed policy: (the digest the set lists, the bytes seen with it).
        self._signed: dict[str, tuple[str, bytes]] = {}
        self._enforced: tuple[dict[str, bytes], tuple[str, ...]] | None = None
        #: Policies were stored but no signed set was, when this sidecar (re)synchronised:
        #: it fails closed rather than enforce nothing (the set was deleted before it started).
        self._unsigned = False
        self._index = index
        self.default: DefaultAction = default
        self._retry = retry
        self._breaker = breaker
        self._raw: dict[str, bytes] = {}
        self.snapshot = compile_snapshot({}, default=default, retry=retry, breaker=breaker)
        self.synced = asyncio.Event()
        #: Bumped on every change that took effect (tests and tools wait on it).
        self.revision = 0
        self._labels: dict[str, tuple[Mapping[str, str], ...]] = {}
        self._decisions: dict[tuple[Any, ...], Decision] = {}
        self._listeners: list[Callable[[], None]] = []
        self._follower: BucketFollower | None = None
        index.on_change(self._index_changed)

    # ---- decisions (no I/O) ------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """True when every call is allowed without looking (no rules, default allow)."""
        return self.snapshot.access.open

    def caller(
        self, name: str | None, spiffe_id: str | None = None, *, verified: bool = False
    ) -> Caller:
        """A caller with the labels of its live registry records."""
        return Caller(name, spiffe_id, verified, self._labels_of(name))

    def verified(self, spiffe_id: str) -> Caller:
        """The caller an mTLS certificate proved, with its labels from the registry."""
        caller = Caller.verified_from(spiffe_id)
        return Caller(caller.name, caller.spiffe_id, True, self._labels_of(caller.name))

    def _labels_of(self, name: str | None) -> tuple[Mapping[str, str], ...]:
        if name is None:
            return ()
        labels = self._labels.get(name)
        if labels is None:
            labels = tuple(dict(r.labels) for r in self._index.records_named(name))
            if len(self._labels) > _DECISION_CACHE:
                self._labels.clear()
            self._labels[name] = labels
        return labels

    def authorize(self, caller: Caller, subject: Subject, *, partial: bool = False) -> Decision:
        key = (caller.name, caller.spiffe_id, caller.verified, subject, partial)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self.snapshot.access.decide(caller, subject, partial=partial)
            if len(self._decisions) > _DECISION_CACHE:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def traffic(self, capability: str) -> TrafficRule | None:
        return self.snapshot.traffic.get(capability)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every change of the compiled state."""
        self._listeners.append(listener)

    def _index_changed(self) -> None:
        # Labels come from registry records: recompute them, and the decisions made with them.
        self._labels.clear()
        self._decisions.clear()

    # ---- feeding -------------------------------------------------------------------------------

    def apply(self, key: str, value: bytes | None) -> None:
        """One watch event: a value (put) or None (delete, purge)."""
        if value is None:
            if self._raw.pop(key, None) is None:
                return
        elif self._raw.get(key) == value:
            return
        else:
            self._raw[key] = value
        if key == SET_KEY and self._trust is not None:
            self._take_set(value)
        # A policy event alone may be a write whose signed set is still on its way: say so
        # quietly; a set or a snapshot that still disagrees with NATS is worth a warning.
        self._rebuild(quiet=key != SET_KEY)

    def replace(self, snapshot: dict[str, bytes]) -> None:
        """Swap everything for a fresh snapshot (after a (re)connection)."""
        if snapshot == self._raw and self.synced.is_set():
            return
        self._raw = dict(snapshot)
        if self._trust is not None:
            self._take_set(snapshot.get(SET_KEY))
            self._unsigned = self.policy_set is None and any(k != SET_KEY for k in snapshot)
        self._rebuild(quiet=False)

    def _take_set(self, value: bytes | None) -> None:
        """The one place a sidecar decides whether a policy set came from the control plane."""
        if value is None:
            if self.policy_set is not None:
                _log.warning(
                    "the signed policy set was deleted from NATS; keeping v%d", self.set_version
                )
            return
        if value == self._set_bytes:
            return
        assert self._trust is not None
        try:
            version, policy_set = self._trust.policies(value)
        except ValueError as exc:
            _log.warning("ignoring a policy set from NATS: %s; keeping v%d", exc, self.set_version)
            return
        if version < self.set_version:
            _log.warning(
                "ignoring policy set v%d from NATS: older than v%d in force (a rollback)",
                version,
                self.set_version,
            )
            return
        self.policy_set, self.set_version, self._set_bytes = policy_set, version, value

    def _in_force(self, *, quiet: bool) -> tuple[dict[str, bytes], tuple[str, ...]]:
        """(name → bytes to enforce, names in force whose content is unknown)."""
        if self._trust is None:
            return {k: v for k, v in self._raw.items() if k != SET_KEY}, ()
        if self.policy_set is None and self._unsigned:
            stored = tuple(sorted(k for k in self._raw if k != SET_KEY))
            _log.error(
                "NATS holds %d policies but no signed policy set: every call fails closed until "
                "the control plane signs them",
                len(stored),
            )
            return {}, stored
        listed = self.policy_set.policies if self.policy_set is not None else {}
        log = _log.info if quiet else _log.warning
        out: dict[str, bytes] = {}
        missing: list[str] = []
        for name, digest in listed.items():
            value = self._raw.get(name)
            if value is not None and policy_digest(value) == digest:
                self._signed[name] = (digest, value)
                out[name] = value
                continue
            kept = self._signed.get(name)
            if kept is not None and kept[0] == digest:
                out[name] = kept[1]
                log(
                    "policy %r in NATS is %s, not what the signed set lists; enforcing its "
                    "last signed copy",
                    name,
                    "gone" if value is None else "different",
                )
            else:
                missing.append(name)
                _log.error(
                    "policy %r is in the signed set, but this sidecar has never seen its signed "
                    "content (%s in NATS); it fails closed until the control plane restores it",
                    name,
                    "gone" if value is None else "different",
                )
        self._signed = {n: v for n, v in self._signed.items() if n in out}
        for name in sorted(set(self._raw) - set(listed) - {SET_KEY}):
            log("ignoring policy %r from NATS: it is not in the signed policy set", name)
        return out, tuple(missing)

    def _rebuild(self, *, quiet: bool = False) -> None:
        enforced = self._in_force(quiet=quiet)
        if enforced == self._enforced and self.synced.is_set():
            return
        try:
            snapshot = compile_snapshot(
                enforced[0],
                default=self.default,
                retry=self._retry,
                breaker=self._breaker,
                missing=enforced[1],
            )
        except Exception:  # a bug, not bad input: keep the last good state rather than crash
            _log.exception("compiling policies failed; keeping the previous state")
            return
        self.snapshot = snapshot
        self._enforced = enforced
        self._decisions.clear()
        self.revision += 1
        _log.info(
            "policies now: %d valid, %d invalid (revision %d)",
            len(snapshot.policies),
            len(snapshot.invalid),
            self.revision,
        )
        for listener in self._listeners:
            listener()

    # ---- the watch task ------------------------------------------------------------------------

    async def open_store(self) -> None:
        await self.store.open()

    def start(self, conn: NatsConnection) -> None:
        self._follower = BucketFollower(
            f"policy bucket {self.store.bucket!r}",
            self.store.watch,
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
            async with asyncio.timeout(timeout):
                await self.synced.wait()
        except TimeoutError as exc:
            raise RegistryUnavailable(
                f"policy bucket {self.store.bucket!r} did not deliver its initial view "
                f"within {timeout:g}s"
            ) from exc
