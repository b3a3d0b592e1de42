"""The security buckets in JetStream KV: trust bundle and revocation list for every workload;
issued certificates and join tokens for the control plane only.

Two buckets per mesh, named after the registry bucket, so test meshes on one NATS never see each
other's state: ``<registry>_security`` (every workload reads it) and ``<registry>_ca`` (only the
control plane's NATS user may touch it, ``agentmesh.security.nats_auth``). Keys:

=============  =======================  ==========================================  ==============
bucket         key                      value                                       lifetime
=============  =======================  ==========================================  ==============
``_security``  ``pub.bundle``           :class:`TrustBundle` (signed by a CA)       until replaced
``_security``  ``pub.revocations``      signed :class:`RevocationList`              until replaced
``_ca``        ``ca.issued.<serial>``   :class:`IdentityRecord`                     cert's expiry
``_ca``        ``ca.token.<sha256>``    signed :class:`StoredToken`                 token's TTL
=============  =======================  ==========================================  ==============

Why two buckets rather than one with subject permissions per key prefix: a workload reads KV
through the JetStream API, and nats-py names the keys it reads in the request *body* (its
watches create consumers with ``$JS.API.CONSUMER.CREATE.<stream>`` and the filter in the body;
a get without direct access is ``$JS.API.STREAM.MSG.GET.<stream>`` with the key in the body), so
a subject permission can allow or refuse a whole stream, not a key prefix. A separate stream is a
boundary NATS enforces. (A control plane from before the split moves ``ca.*`` keys over once:
:meth:`SecurityStore.open_private`.)

Every sidecar watches ``pub.>`` only. What a sidecar or the control plane acts on is signed
(``security/signed.py``): a bundle by a CA already trusted, the revocation list (which also holds
the identity blocks) and token records by the mesh CA, with a version that only grows. A writer
of NATS can delete or replace these keys, and readers keep the last good state and log why.
Issued-certificate records are informational (``identity list``, revoking a name's serials);
revoking a serial needs none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import ValidationError

from agentmesh.errors import AuthenticationFailed, RegistryUnavailable
from agentmesh.models import IdentityRecord, SignedState, StoredToken, TrustBundle
from agentmesh.registry.connection import NatsConnection
from agentmesh.registry.entries import read_entries, stream_holds
from agentmesh.registry.follow import BucketFollower

if TYPE_CHECKING:
    from agentmesh.security.signed import StateTrust

__all__ = [
    "REVOCATIONS_KEY",
    "SecurityStore",
    "SecurityView",
    "StateConflict",
    "ca_bucket",
    "security_bucket",
]

_log = logging.getLogger("agentmesh.security")

BUNDLE_KEY = "pub.bundle"
REVOCATIONS_KEY = "pub.revocations"
_ISSUED = "ca.issued."
_TOKEN = "ca.token."
_PRIVATE = "ca."
#: What every sidecar watches: the trust bundle and the revocation list.
_PUBLIC_KEYS = "pub.>"
_PUBLIC_SUFFIX = "_security"
#: Entries tied to a certificate outlive it a little: clocks differ between machines.
_SLACK = 300.0
#: Compare-and-set attempts on a token before giving up (each re-reads it).
_TOKEN_ATTEMPTS = 10


def security_bucket(registry_bucket: str) -> str:
    return f"{registry_bucket}{_PUBLIC_SUFFIX}"


def ca_bucket(registry_bucket: str) -> str:
    """The control plane's own bucket: issued certificates and join tokens."""
    return f"{registry_bucket}_ca"


def _ttl_until(when: datetime) -> float:
    return max((when - datetime.now(UTC)).total_seconds() + _SLACK, 1.0)


class StateConflict(Exception):
    """A signed document changed since it was read (compare-and-set failed): read it again."""


class SecurityStore:
    """Typed access to the security bucket."""

    def __init__(self, conn: NatsConnection, bucket: str) -> None:
        self._conn = conn
        self.bucket = bucket
        self.ca_bucket = ca_bucket(bucket.removesuffix(_PUBLIC_SUFFIX))
        self._kv: KeyValue | None = None
        self._ca_kv: KeyValue | None = None

    @property
    def ca_kv(self) -> KeyValue:
        """The control plane's bucket (:meth:`open_private` first)."""
        assert self._ca_kv is not None, "open_private() first"
        return self._ca_kv

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RegistryUnavailable(f"security bucket {self.bucket!r}: not opened")
        return self._kv

    async def open(self) -> None:
        """Create the bucket if needed (idempotent; a second call keeps the first handle)."""
        if self._kv is None:
            self._kv = await self._open(self.bucket, "trust bundle, revocations")

    async def open_private(self) -> None:
        """Open the control plane's bucket (issued certificates, join tokens), and move there
        the ``ca.*`` keys a control plane from before the split left in the public one (the
        control plane's start; other holders of the CA files only open it, on first use)."""
        await self.open()
        await self._private()
        moved = 0
        for key, value in await self._entries(self.kv, self.bucket, _PRIVATE):
            ttl = _private_ttl(key, value)
            if ttl is not None:
                await self._put(self.ca_kv, self.ca_bucket, key, value, ttl)
            await self.kv.purge(key)
            moved += 1
        if moved:
            _log.warning(
                "moved %d issued-certificate and token records to %s", moved, self.ca_bucket
            )

    async def _open(self, bucket: str, holds: str) -> KeyValue:
        js = self._conn.client.jetstream()
        what = f"opening security bucket {bucket!r}"
        try:
            return await self._conn.through_election(
                lambda: js.create_key_value(
                    bucket=bucket,
                    replicas=self._conn.replicas(),
                    history=1,
                    limit_marker_ttl=1.0,
                    description=f"agentmesh security: {holds}",
                ),
                what,
            )
        except nats.js.errors.BadRequestError:
            return await self._conn.through_election(lambda: js.key_value(bucket), what)
        except Exception as exc:
            raise RegistryUnavailable(
                f"security bucket {bucket!r} on NATS at {self._conn.url}: {exc}"
            ) from exc

    async def _private(self) -> KeyValue:
        if self._ca_kv is None:
            self._ca_kv = await self._open(self.ca_bucket, "issued certificates, join tokens")
        return self._ca_kv

    async def _put(
        self, kv: KeyValue, bucket: str, key: str, data: bytes, ttl: float | None = None
    ) -> int:
        async def put() -> int:  # a plain put: repeating it after a timeout is harmless
            if ttl is None:
                return int(await kv.put(key, data))
            # A per-message TTL needs a plain publish (KV put has no TTL parameter).
            ack = await self._conn.client.jetstream().publish(
                f"$KV.{bucket}.{key}", data, msg_ttl=max(int(ttl + 0.999), 1)
            )
            return int(ack.seq)

        try:
            return await self._conn.through_election(put, f"writing {key}")
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"writing {key} to {bucket!r}: {exc}") from exc

    async def _get(self, kv: KeyValue, bucket: str, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"reading {key} from {bucket!r}: {exc}") from exc
        if not entry.value:
            return None  # a marker the server left (an expired entry)
        return entry.value, int(entry.revision or 0)

    async def _entries(self, kv: KeyValue, bucket: str, prefix: str) -> list[tuple[str, bytes]]:
        entries = await read_entries(self._conn, kv, bucket, f"{prefix}>")
        return [
            (e.key, e.value) for e in entries if e.operation not in ("DEL", "PURGE") and e.value
        ]

    # ---- trust bundle ---------------------------------------------------------------------

    async def bundle(self) -> TrustBundle | None:
        found = await self._get(self.kv, self.bucket, BUNDLE_KEY)
        if found is None:
            return None
        try:
            return TrustBundle.model_validate_json(found[0])
        except ValidationError:
            _log.warning("ignoring a malformed trust bundle in %s", self.bucket)
            return None

    async def put_bundle(self, bundle: TrustBundle) -> None:
        await self._put(self.kv, self.bucket, BUNDLE_KEY, bundle.model_dump_json().encode())

    # ---- signed documents -------------------------------------------------------------------

    async def signed(self, key: str) -> tuple[bytes, int] | None:
        """The bytes and revision under ``key`` (to verify, then compare-and-set), or None."""
        return await self._get(self.kv, self.bucket, key)

    async def put_signed(
        self, key: str, state: SignedState, *, last: int | None, ttl: float | None = None
    ) -> int:
        """Write ``state`` if ``key`` is still at revision ``last`` (None: absent or deleted)."""
        data = state.model_dump_json().encode()
        headers = {"Nats-Expected-Last-Subject-Sequence": str(last)} if last is not None else {}
        try:
            if last is None and ttl is None:
                return int(await self.kv.create(key, data))
            ack = await self._conn.client.jetstream().publish(
                f"$KV.{self.bucket}.{key}",
                data,
                headers=headers or None,
                msg_ttl=None if ttl is None else max(int(ttl + 0.999), 1),
            )
            return int(ack.seq)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise StateConflict(f"{key} changed meanwhile") from exc
        except nats.js.errors.APIError as exc:
            if exc.err_code in (10071, 10164):
                raise StateConflict(f"{key} changed meanwhile") from exc
            raise RegistryUnavailable(f"writing {key} to {self.bucket!r}: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"writing {key} to {self.bucket!r}: {exc}") from exc

    # ---- issued certificates ----------------------------------------------------------------

    async def record_issued(self, record: IdentityRecord) -> None:
        data = record.model_dump_json().encode()
        ttl = _ttl_until(record.not_after)
        await self._put(await self._private(), self.ca_bucket, _ISSUED + record.serial, data, ttl)

    async def issued(self) -> list[IdentityRecord]:
        out = []
        for _key, value in await self._entries(await self._private(), self.ca_bucket, _ISSUED):
            with contextlib.suppress(ValidationError):
                out.append(IdentityRecord.model_validate_json(value))
        return out

    # ---- join tokens -----------------------------------------------------------------------

    async def add_token(self, digest: str, token: SignedState, expires_at: datetime | None) -> None:
        ttl = None if expires_at is None else _ttl_until(expires_at) - _SLACK
        data = token.model_dump_json().encode()
        await self._put(await self._private(), self.ca_bucket, _TOKEN + digest, data, ttl)

    async def use_token(
        self,
        digest: str,
        verify: Callable[[str, bytes], StoredToken],
        spent: Callable[[str, StoredToken], SignedState],
    ) -> StoredToken:
        """Spend one use of a token (compare-and-set, so two enrolments cannot share the last).

        ``verify(digest, value)`` opens the signed record (raising ValueError when it is not the
        control plane's); ``spent(digest, token)`` signs the record with one use fewer.
        """
        kv = await self._private()
        for _ in range(_TOKEN_ATTEMPTS):
            found = await self._get(kv, self.ca_bucket, _TOKEN + digest)
            if found is None:
                raise AuthenticationFailed("join token is unknown, expired or used up")
            value, revision = found
            try:
                token = verify(digest, value)
            except ValueError as exc:
                _log.warning("refusing join-token record %s…: %s", digest[:12], exc)
                raise AuthenticationFailed("join token is unknown, expired or used up") from None
            if token.expires_at is not None and token.expires_at <= datetime.now(UTC):
                raise AuthenticationFailed("join token has expired")
            if token.uses is None:
                return token
            try:
                if token.uses <= 1:
                    await kv.delete(_TOKEN + digest, last=revision)
                else:
                    left = token.model_copy(update={"uses": token.uses - 1})
                    data = spent(digest, left).model_dump_json().encode()
                    await kv.update(_TOKEN + digest, data, revision)
                return token
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except nats.js.errors.APIError as exc:
                if exc.err_code in (10071, 10164):
                    continue
                raise RegistryUnavailable(f"using a join token: {exc}") from exc
            except (nats.errors.Error, OSError) as exc:
                raise RegistryUnavailable(f"using a join token: {exc}") from exc
        raise AuthenticationFailed("join token is being used concurrently; try again")


def _private_ttl(key: str, value: bytes) -> float | None:
    """How long a ``ca.*`` record being moved still has to live (None: drop it)."""
    try:
        if key.startswith(_ISSUED):
            return _ttl_until(IdentityRecord.model_validate_json(value).not_after)
        token = StoredToken.model_validate_json(SignedState.model_validate_json(value).payload)
    except ValidationError:
        return None
    return None if token.expires_at is None else _ttl_until(token.expires_at) - _SLACK


class SecurityView:
    """What every sidecar keeps of the bucket: the revocation list and the latest trust bundle.

    Watch-fed like the registry index, but what it enforces only ever moves forward: the
    revocation list is taken only if the mesh CA signed it (``trust.revocations``) with a version
    at least the one in force. A deleted, unsigned, badly signed or older list is logged and
    changes nothing, across reconnections too: while NATS is gone, or lies, the last good list
    stays enforced. (The trust bundle is checked by ``WorkloadIdentity``, against the roots.)
    """

    def __init__(self) -> None:
        self.revoked: frozenset[int] = frozenset()
        self.bundle: TrustBundle | None = None
        #: The version of the revocation list in force (0: none yet).
        self.version = 0
        #: Its raw bytes, so that a re-delivery of the same document is no news.
        self._list: bytes | None = None
        #: The last list read from NATS, taken or not.
        self._seen: bytes | None = None
        self.synced = asyncio.Event()
        self._trust: StateTrust | None = None
        self._listeners: list[Callable[[], None]] = []
        self._follower: BucketFollower | None = None

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def start(self, store: SecurityStore, conn: NatsConnection, trust: StateTrust) -> None:
        self._trust = trust
        self._follower = BucketFollower(
            "security",
            lambda: store.kv.watch(_PUBLIC_KEYS),
            replace=self._replace,
            apply=self._apply,
            synced=self.synced,
            stored=lambda: stream_holds(conn, store.bucket, _PUBLIC_KEYS),
        )
        self._follower.start(conn)

    async def stop(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            await follower.stop()

    def _replace(self, snapshot: dict[str, bytes]) -> None:
        """A full view (first, or after a reconnection): what it lacks was deleted."""
        for key in (BUNDLE_KEY, REVOCATIONS_KEY):
            self._apply(key, snapshot.get(key), notify=False)
        self._notify()

    def _apply(self, key: str, value: bytes | None, *, notify: bool = True) -> None:
        if key == BUNDLE_KEY:
            if value is not None:
                try:
                    self.bundle = TrustBundle.model_validate_json(value)
                except ValidationError:
                    _log.warning("ignoring a malformed trust bundle")
        elif key == REVOCATIONS_KEY:
            self._take_revocations(value)
        if notify:
            self._notify()

    def recheck(self) -> None:
        """Check the last list read again (the trust roots changed: it may verify now)."""
        self._take_revocations(self._seen)
        self._notify()

    def _take_revocations(self, value: bytes | None) -> None:
        """The one place a sidecar decides whether a revocation list came from the CA."""
        self._seen = value if value is not None else self._seen
        if value is None:
            if self.version:
                _log.warning(
                    "the revocation list was deleted from NATS; keeping v%d (%d revoked)",
                    self.version,
                    len(self.revoked),
                )
            return
        if value == self._list:
            return
        assert self._trust is not None
        try:
            version, document = self._trust.revocations(value)
        except ValueError as exc:
            _log.warning("ignoring a revocation list from NATS: %s; keeping v%d", exc, self.version)
            return
        if version < self.version:
            _log.warning(
                "ignoring revocation list v%d from NATS: older than v%d in force (a rollback)",
                version,
                self.version,
            )
            return
        revoked = set()
        for r in document.revoked:
            with contextlib.suppress(ValueError):
                revoked.add(int(r.serial, 16))
        self.revoked, self.version, self._list = frozenset(revoked), version, value

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                _log.exception("security view listener failed")
