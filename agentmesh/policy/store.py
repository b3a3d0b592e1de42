"""The policy bucket in JetStream KV: one key per policy, every change a new revision.

Next to the policies, under :data:`SET_KEY`, the control plane keeps the signed
:class:`~agentmesh.models.PolicySet`: the hash of every policy in force. Sidecars enforce a
stored policy only as that set lists it (``policy/cache.py``), so a key written, altered or
deleted around the control plane changes nothing enforced.

The bucket keeps the last ``HISTORY`` revisions of each key, so ``agentmesh get policy NAME
--history`` can show what changed and when; a deletion is a delete marker (a revision too),
never a purge. Writes are compare-and-set on the key's last revision, so two operators applying
at once cannot silently overwrite each other. Reads go through ordered consumers on the stream,
which see every write acknowledged before them (no stale follower reads on a single server).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from agentmesh.errors import RegistryUnavailable
from agentmesh.models import MAX_RECORD_BYTES
from agentmesh.registry.connection import NatsConnection
from agentmesh.registry.entries import read_entries

__all__ = [
    "HISTORY",
    "SET_KEY",
    "PolicyConflict",
    "PolicyEntry",
    "PolicyStore",
    "policy_bucket",
    "policy_digest",
]

#: Revisions kept per policy (JetStream KV allows at most 64).
HISTORY = 16
#: The key of the signed policy set; '_' starts no policy name, so it never collides with one.
SET_KEY = "_policyset"
_KV_OP = "KV-Operation"


def policy_digest(value: bytes) -> str:
    """What the signed policy set lists for a stored policy: SHA-256 of its bytes, hex."""
    return hashlib.sha256(value).hexdigest()


def policy_bucket(registry_bucket: str) -> str:
    """The policy bucket of the mesh whose registry is ``registry_bucket`` (tests isolate both)."""
    return f"{registry_bucket}_policies"


class PolicyConflict(Exception):
    """The key changed since the revision the writer read (compare-and-set failed)."""


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """One revision of one key: a value written, or a deletion."""

    name: str
    revision: int
    operation: Literal["put", "delete"]
    value: bytes
    updated: datetime | None


class PolicyStore:
    """Typed access to the policy bucket."""

    def __init__(self, conn: NatsConnection, bucket: str) -> None:
        self._conn = conn
        self.bucket = bucket
        self._kv: KeyValue | None = None

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RegistryUnavailable(f"policy bucket {self.bucket!r}: not opened")
        return self._kv

    async def open(self) -> None:
        """Create the bucket if it does not exist yet (idempotent across processes)."""
        js = self._conn.client.jetstream()
        try:
            self._kv = await self._conn.through_election(
                lambda: js.create_key_value(
                    bucket=self.bucket,
                    replicas=self._conn.replicas(),
                    history=HISTORY,
                    max_value_size=MAX_RECORD_BYTES,
                    description="agentmesh policies: one AccessPolicy or TrafficPolicy per key",
                ),
                f"opening policy bucket {self.bucket!r}",
            )
        except nats.js.errors.BadRequestError:
            self._kv = await self._conn.through_election(
                lambda: js.key_value(self.bucket), f"opening policy bucket {self.bucket!r}"
            )
        except Exception as exc:
            raise RegistryUnavailable(
                f"policy bucket {self.bucket!r} on NATS at {self._conn.url}: {exc}"
            ) from exc

    async def watch(self) -> Any:
        """A watcher over every key: initial values, then ``None``, then live changes."""
        try:
            return await self.kv.watchall()
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"watching policy bucket {self.bucket!r}: {exc}") from exc

    async def _read(self, keys: str, *, history: bool) -> list[PolicyEntry]:
        """Entries of ``keys`` (a key or ``>``): the latest per key, or every kept revision."""
        return [
            _entry(e)
            for e in await read_entries(self._conn, self.kv, self.bucket, keys, history=history)
        ]

    async def latest(self, name: str) -> PolicyEntry | None:
        """The newest revision of ``name``, deletions included; None if it never existed."""
        entries = await self._read(name, history=False)
        return entries[-1] if entries else None

    async def all(self) -> list[PolicyEntry]:
        """The newest revision of every key that is not deleted, sorted by name."""
        entries = await self._read(">", history=False)
        return sorted(
            (e for e in entries if e.operation == "put" and e.name != SET_KEY),
            key=lambda e: e.name,
        )

    async def history(self, name: str) -> list[PolicyEntry]:
        """Every kept revision of ``name``, oldest first."""
        return await self._read(name, history=True)

    async def put(self, name: str, value: bytes, *, last: int) -> int:
        """Write ``value`` if the key's newest revision is still ``last`` (0: never written)."""
        return await self._publish(name, value, last=last, headers={})

    async def delete(self, name: str, *, last: int) -> int:
        """Write a delete marker (the history stays) if the newest revision is still ``last``."""
        return await self._publish(name, b"", last=last, headers={_KV_OP: "DEL"})

    async def _publish(self, name: str, value: bytes, *, last: int, headers: dict[str, str]) -> int:
        headers = {**headers, "Nats-Expected-Last-Subject-Sequence": str(last)}
        try:
            ack = await self._conn.client.jetstream().publish(
                f"$KV.{self.bucket}.{name}", value, headers=headers
            )
        except nats.js.errors.APIError as exc:
            if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or exc.err_code in (
                10071,
                10164,
            ):
                raise PolicyConflict(f"policy {name!r} changed meanwhile") from exc
            raise RegistryUnavailable(f"writing policy {name!r}: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"writing policy {name!r}: {exc}") from exc
        return int(ack.seq)


def _entry(entry: Any) -> PolicyEntry:
    deleted = entry.operation in ("DEL", "PURGE")
    return PolicyEntry(
        name=entry.key,
        revision=int(entry.revision or 0),
        operation="delete" if deleted else "put",
        value=b"" if deleted else (entry.value or b""),
        updated=entry.created,
    )
