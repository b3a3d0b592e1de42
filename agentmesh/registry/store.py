"""The registry bucket in JetStream KV: one key per agent instance, written with a lease.

The key is ``<agent name>.<instance id>`` (:func:`record_key`): KV keys are NATS subjects
(``$KV.<bucket>.<key>``), so "an agent writes only its own records" is the NATS permission to
publish on ``$KV.<bucket>.<its name>.>`` (see security/nats_auth.py).

Every write is compare-and-set on the key's last revision, so one instance can never overwrite
another's record; every write carries a per-message TTL (nats-server >= 2.11), so a record that
is not renewed expires on the server and reaches every watcher as a delete marker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from agentmesh.errors import RegistrationError, RegistryUnavailable
from agentmesh.models import MAX_RECORD_BYTES, AgentRecord
from agentmesh.registry.cluster import kv_stream
from agentmesh.registry.connection import NatsConnection
from agentmesh.registry.entries import stream_holds

__all__ = ["RecordConflict", "RegistryStore", "instance_of", "record_key", "record_part"]

#: How long the server keeps the delete marker of an expired record: long enough for every
#: watcher to see it, short enough that a re-registration with the same key is not blocked.
_MARKER_TTL = 1.0


def record_key(record: AgentRecord) -> str:
    """The KV key of ``record``: its agent's name, then its instance id."""
    return f"{record.name}.{record.instance_id}"


def instance_of(key: str) -> str | None:
    """The instance id in a registry key, or None for a key of another layout."""
    name, dot, instance = key.partition(".")
    return instance if dot and name and instance and "." not in instance else None


class RecordConflict(RegistrationError):
    """The key's revision is not the one this writer last wrote: someone else owns it now."""


class RegistryStore:
    """Typed access to the registry bucket."""

    def __init__(self, conn: NatsConnection, bucket: str) -> None:
        self._conn = conn
        self.bucket = bucket
        self._kv: KeyValue | None = None
        #: Signs a record's JSON with this workload's mesh key (``WorkloadIdentity.seal_record``);
        #: None with mTLS off, where records go unsigned.
        self.seal: Callable[[bytes], bytes] | None = None

    @property
    def connected(self) -> bool:
        """Whether NATS is reachable right now (writes would otherwise wait for a timeout)."""
        return self._conn.connected.is_set()

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RegistryUnavailable(f"registry bucket {self.bucket!r}: not opened")
        return self._kv

    async def open(self) -> None:
        """Create the bucket if it does not exist yet (idempotent across processes)."""
        js = self._conn.client.jetstream()
        try:
            self._kv = await self._conn.through_election(
                lambda: js.create_key_value(
                    bucket=self.bucket,
                    replicas=self._conn.replicas(),
                    history=1,
                    max_value_size=MAX_RECORD_BYTES,
                    limit_marker_ttl=_MARKER_TTL,
                    description="agentmesh registry: one record per agent instance",
                ),
                f"opening registry bucket {self.bucket!r}",
            )
        except nats.js.errors.BadRequestError:
            self._kv = await self._conn.through_election(
                lambda: js.key_value(self.bucket), f"opening registry bucket {self.bucket!r}"
            )
        except Exception as exc:
            raise RegistryUnavailable(
                f"registry bucket {self.bucket!r} on NATS at {self._conn.url}: {exc}"
            ) from exc

    def encode(self, record: AgentRecord) -> bytes:
        """The value stored for ``record``: its JSON, signed when this workload has a key."""
        data = record.model_dump_json().encode()
        if self.seal is not None:
            data = self.seal(data)
        if len(data) > MAX_RECORD_BYTES:
            raise RegistrationError(
                f"record of agent {record.instance_id} is {len(data)} bytes; "
                f"the registry accepts at most {MAX_RECORD_BYTES}"
            )
        return data

    async def create(self, record: AgentRecord, ttl: int) -> int:
        """Write a new record; refuse if a live record already holds the key."""
        data = self.encode(record)
        key = record_key(record)
        tries = 0

        async def attempt() -> int:
            nonlocal tries
            tries += 1
            try:
                return int(await self.kv.create(key, data, msg_ttl=ttl))
            except nats.js.errors.KeyWrongLastSequenceError as exc:
                if tries > 1:  # an attempt that timed out (no leader yet) may have landed later
                    current = await self.get(key)
                    if current is not None and current[0] == data:
                        return current[1]
                # The last message may be the server's marker for an expired record, which
                # nats-py does not recognise as a deletion: then the key is free, take it over.
                marker = await self._marker_revision(key)
                if marker is None:
                    raise RecordConflict(
                        f"agent instance {record.instance_id} is already registered by another "
                        "process"
                    ) from exc
                return await self.renew(record, marker, ttl)

        try:
            return await self._conn.through_election(attempt, f"registering {record.instance_id}")
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"registering {record.instance_id}: {exc}") from exc

    async def _marker_revision(self, key: str) -> int | None:
        """The revision of a deletion/expiry marker under ``key``, if that is its last."""
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyDeletedError as exc:
            return int(exc.entry.revision or 0)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"reading {key}: {exc}") from exc
        return None if entry.value else int(entry.revision or 0)

    async def renew(self, record: AgentRecord, revision: int, ttl: int) -> int:
        """Rewrite our record (renewing its lease) only if nobody else wrote since ``revision``."""
        headers = {"Nats-Expected-Last-Subject-Sequence": str(revision)}
        try:
            ack = await self._conn.client.jetstream().publish(
                f"$KV.{self.bucket}.{record_key(record)}",
                self.encode(record),
                headers=headers,
                msg_ttl=ttl,
            )
        except nats.js.errors.APIError as exc:
            if _wrong_sequence(exc):
                raise RecordConflict(
                    f"record of {record.instance_id} changed since revision {revision}"
                ) from exc
            raise RegistryUnavailable(f"renewing {record.instance_id}: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"renewing {record.instance_id}: {exc}") from exc
        return int(ack.seq)

    async def delete(self, key: str, revision: int | None = None) -> None:
        """Delete the record under ``key`` (:func:`record_key`), if still at ``revision``."""
        try:
            await self._conn.through_election(
                lambda: self.kv.delete(key, last=revision), f"deregistering {key}"
            )
        except nats.js.errors.APIError as exc:
            if _wrong_sequence(exc):
                raise RecordConflict(f"record of {key} changed before deregistration") from exc
            raise RegistryUnavailable(f"deregistering {key}: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"deregistering {key}: {exc}") from exc

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The live value and revision under ``key``, or None if absent or deleted.

        Read from the stream's leader, not with a direct get that any replica may answer: on a
        cluster a lagging follower would hand back an old revision, and the compare-and-set
        that follows (a renewal, a deregistration) would fail again.
        """
        try:
            msg = await self._conn.client.jetstream().get_msg(
                kv_stream(self.bucket), subject=f"$KV.{self.bucket}.{key}"
            )
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"reading {key}: {exc}") from exc
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
            return None  # deleted, or the server's marker of an expired record (never empty)
        return msg.data, int(msg.seq or 0)

    async def watch(self) -> Any:
        """A watcher over every key: initial values, then ``None``, then live changes."""
        try:
            return await self.kv.watchall()
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"watching registry bucket {self.bucket!r}: {exc}") from exc

    async def stored(self) -> bool:
        """Whether the bucket's stream holds any value (deleted keys aside): see follow.py."""
        return await stream_holds(self._conn, self.bucket, ">")


def _wrong_sequence(exc: nats.js.errors.APIError) -> bool:
    """JetStream's "wrong last sequence": the compare in compare-and-set failed."""
    return isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or exc.err_code in (
        10071,
        10164,
    )


def record_part(value: bytes) -> bytes:
    """The record's JSON in a registry value: what precedes the workload's proof line, if any.

    A record's JSON never holds a raw newline (JSON escapes it inside strings), so the first one
    ends it (``security/signed.py`` writes and checks the proof).
    """
    end = value.find(b"\n")
    return value if end < 0 else value[:end]
