"""The signed policy set: the control plane's word on which stored policies are in force.

After every policy write (``control/policies.py``), the control plane lists the bytes it wrote
in the :class:`~agentmesh.models.PolicySet` (name → SHA-256), signs it with the mesh CA's key as
a new version and writes it compare-and-set under ``SET_KEY``. Sidecars enforce exactly what
that set lists (``policy/cache.py``). So a policy key written, altered or deleted by anyone
else who can reach NATS changes nothing enforced, and neither does an older set written back.

A write is signed only if the key still holds it: if another writer got in between (another
control plane applying the same name, or someone writing around the control plane), the
change is refused rather than signed blind.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from agentmesh.control.ca import CertificateAuthority
from agentmesh.control.kept import keep, kept
from agentmesh.errors import InvalidInput, RegistryUnavailable
from agentmesh.models import PolicySet, SignedState
from agentmesh.policy.store import SET_KEY, PolicyConflict, PolicyStore, policy_digest
from agentmesh.security.signed import StateTrust, next_version

__all__ = ["PolicySigner"]

_log = logging.getLogger("agentmesh.control")

#: Compare-and-set attempts on the policy set before a write gives up.
_CAS_ATTEMPTS = 8


class PolicySigner:
    """Keeps the signed policy set in step with the policies the control plane writes."""

    def __init__(
        self, store: PolicyStore, ca: CertificateAuthority, *, kept_in: Path | None = None
    ) -> None:
        self.store = store
        self._ca = ca
        self._trust = StateTrust(lambda: ca.roots, lambda: ca.trust_domain)
        #: The last set verified or written: kept (and written back) if NATS loses it, also
        #: on disk in ``kept_in`` (control/kept.py), where a restart starts from.
        self._last: SignedState | None = None
        self._last_set = PolicySet()
        self._kept = kept_in / "policyset.json" if kept_in is not None else None
        value = kept(self._kept)
        if value is not None:
            try:
                _, self._last_set = self._trust.policies(value)
                self._last = SignedState.model_validate_json(value)
            except ValueError as exc:
                _log.warning("ignoring the policy set kept in %s: %s", self._kept, exc)

    async def current(self) -> tuple[PolicySet, int]:
        """(the set in force, the KV revision of ``SET_KEY`` to compare-and-set against, 0 if
        none): KV's if the CA signed it and it is not older than the last one seen here."""
        entry = await self.store.latest(SET_KEY)
        if entry is None or entry.operation == "delete":
            if self._last is not None:
                _log.warning(
                    "the signed policy set is gone from NATS; v%d stays in force",
                    self._last.version,
                )
            return self._last_set, entry.revision if entry is not None else 0
        try:
            version, policy_set = self._trust.policies(entry.value)
        except ValueError as exc:
            _log.warning("ignoring the policy set in NATS: %s", exc)
            return self._last_set, entry.revision
        if self._last is not None and version < self._last.version:
            _log.warning(
                "ignoring policy set v%d in NATS: older than v%d (a rollback)",
                version,
                self._last.version,
            )
            return self._last_set, entry.revision
        if self._last is None or version > self._last.version:
            self._last = SignedState.model_validate_json(entry.value)
            self._last_set = policy_set
            keep(self._kept, self._last)
        return policy_set, entry.revision

    async def sign(self, name: str, revision: int, value: bytes | None) -> None:
        """List ``value`` (None: no policy) as ``name`` in the signed set.

        ``revision`` is the key's revision that holds ``value`` (for a deletion: the revision
        about to be deleted); if the key moved on, nothing is signed (InvalidInput).
        """
        for _ in range(_CAS_ATTEMPTS):
            latest = await self.store.latest(name)
            if (latest.revision if latest is not None else 0) != revision:
                raise InvalidInput(
                    f"policy {name!r} changed in NATS before the control plane could sign it; "
                    "apply it again"
                )
            current, set_revision = await self.current()
            policies = dict(current.policies)
            if value is None:
                policies.pop(name, None)
            else:
                policies[name] = policy_digest(value)
            if policies == current.policies and self._last is not None:
                return
            document = PolicySet(policies=policies)
            state = self._ca.sign_state(
                "policies", next_version(self._last.version if self._last else 0), document
            )
            try:
                await self.store.put(SET_KEY, state.model_dump_json().encode(), last=set_revision)
            except PolicyConflict:
                continue
            self._last, self._last_set = state, document
            keep(self._kept, state)
            return
        raise RegistryUnavailable("the signed policy set kept changing while it was written")

    async def adopt(self) -> None:
        """Sign the stored policies if there has never been a policy set (an upgrade from a
        version that did not sign them). A set deleted from NATS leaves a marker: never again."""
        if await self.store.latest(SET_KEY) is not None:
            return
        stored = await self.store.all()
        if not stored:
            return
        _log.warning(
            "signing the %d policies found without a signed policy set (stored by a version "
            "that did not sign them): %s",
            len(stored),
            ", ".join(e.name for e in stored),
        )
        document = PolicySet(policies={e.name: policy_digest(e.value) for e in stored})
        state = self._ca.sign_state("policies", next_version(0), document)
        with contextlib.suppress(PolicyConflict):
            await self.store.put(SET_KEY, state.model_dump_json().encode(), last=0)
            self._last, self._last_set = state, document
            keep(self._kept, state)

    async def guard(self) -> None:
        """Write back what NATS lost or was given forged: the last good set, and each listed
        policy whose bytes are not the signed ones (found again in the key's history). Running
        sidecars keep enforcing their last good copy anyway; this is for those that start later.
        """
        state = self._last
        policy_set, _ = await self.current()
        if state is not None and self._last is state:
            entry = await self.store.latest(SET_KEY)
            if entry is None or entry.value != state.model_dump_json().encode():
                _log.warning("restoring policy set v%d in NATS", state.version)
                try:
                    await self.store.put(
                        SET_KEY,
                        state.model_dump_json().encode(),
                        last=entry.revision if entry is not None else 0,
                    )
                except PolicyConflict:
                    return
        stored = {e.name: policy_digest(e.value) for e in await self.store.all()}
        for name, digest in policy_set.policies.items():
            if stored.get(name) != digest:
                await self._restore(name, digest)

    async def _restore(self, name: str, digest: str) -> None:
        history = await self.store.history(name)
        signed = [e for e in history if e.operation == "put" and policy_digest(e.value) == digest]
        if not signed:
            _log.error(
                "policy %r is in the signed set, but neither NATS nor its history holds its "
                "signed content: apply it again",
                name,
            )
            return
        _log.warning("restoring policy %r in NATS (it was deleted or altered)", name)
        last = history[-1].revision if history else 0
        with contextlib.suppress(PolicyConflict):
            await self.store.put(name, signed[-1].value, last=last)
