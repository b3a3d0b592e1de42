"""Registry records read from a snapshot but not verified yet: the index's waiting room.

Checking a signed record (its signature and its certificate's, ``security/signed.py``) costs far
more than parsing it (docs/benchmarks.md has both), so a new sidecar verifying a 10,000-record
snapshot before anything else would hold its event loop for seconds. Instead, the snapshot's signed
values are parsed and wait here, each under the capabilities and agent name it claims, so the index
can verify exactly what a call or a decision is about to use, and a background verifier the rest
(``LocalIndex``). A waiting record is never resolved, listed or counted: this room only says which
ones to verify.

Bounded by the bytes of its values: past the limit the index verifies as values arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from agentmesh.models import AgentRecord

__all__ = ["Unverified", "Waiting"]


@dataclass(frozen=True, slots=True)
class Waiting:
    """One value as read from KV, and the record it claims to be (parsed, not verified)."""

    key: str
    value: bytes
    claim: AgentRecord


class Unverified:
    """Waiting values by instance id, oldest first, findable by capability and by agent name."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.entries: dict[str, Waiting] = {}
        #: capability name → instance ids waiting with it (read on the resolve path: a dict).
        self.by_capability: dict[str, dict[str, None]] = {}
        self._by_name: dict[str, dict[str, None]] = {}
        self.size = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, instance: str, waiting: Waiting) -> bool:
        """Hold ``waiting`` for ``instance`` (replacing what it held); False when full."""
        self.pop(instance)
        if self.size + len(waiting.value) > self.limit_bytes:
            return False
        self.entries[instance] = waiting
        self.size += len(waiting.value)
        for spec in waiting.claim.capabilities:
            self.by_capability.setdefault(spec.name, {})[instance] = None
        self._by_name.setdefault(waiting.claim.name, {})[instance] = None
        return True

    def pop(self, instance: str) -> Waiting | None:
        waiting = self.entries.pop(instance, None)
        if waiting is None:
            return None
        self.size -= len(waiting.value)
        for spec in waiting.claim.capabilities:
            _discard(self.by_capability, spec.name, instance)
        _discard(self._by_name, waiting.claim.name, instance)
        return waiting

    def offering(self, capability: str, limit: int) -> list[str]:
        """At most ``limit`` instances waiting with ``capability``, oldest first."""
        return list(islice(self.by_capability.get(capability, {}), limit))

    def named(self, name: str) -> list[str]:
        """Every instance waiting with agent name ``name``."""
        return list(self._by_name.get(name, {}))

    def count_named(self, name: str) -> int:
        """How many instances wait with agent name ``name``."""
        return len(self._by_name.get(name, ()))

    def oldest(self, limit: int) -> list[str]:
        return list(islice(self.entries, limit))


def _discard(groups: dict[str, dict[str, None]], group: str, instance: str) -> None:
    members = groups.get(group)
    if members is not None:
        members.pop(instance, None)
        if not members:
            del groups[group]
