"""The security bucket in JetStream KV: trust bundle, revocations, issued certificates, tokens.

One bucket per mesh, named after the registry bucket (``<registry>_security``), so test meshes
on one NATS never see each other's state. Keys:

==========================  =================================================  ===============
key                         value                                              lifetime
==========================  =================================================  ===============
``pub.bundle``              :class:`TrustBundle` (signed)                      until replaced
``pub.revoked.<serial>``    :class:`Revocation`                                the cert's expiry
``ca.issued.<serial>``      :class:`IdentityRecord`                            the cert's expiry
``ca.token.<sha256>``       :class:`StoredToken` (only a hash of the secret)   the token's TTL
``ca.block.<kind>.<name>``  :class:`IdentityBlock`                             kept
==========================  =================================================  ===============

Every sidecar watches ``pub.>`` only. Anyone who can write to NATS can write here: revocation
entries could be deleted or added (deny of service), so production NATS needs credentials;
a bundle written here is taken only if a root the sidecar already trusts signed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import ValidationError

from agentmesh.errors import AuthenticationFailed, RegistryUnavailable
from agentmesh.models import (
    IdentityBlock,
    IdentityRecord,
    Revocation,
    StoredToken,
    TrustBundle,
)
from agentmesh.registry.connection import NatsConnection

__all__ = ["SecurityStore", "SecurityView", "security_bucket"]

_log = logging.getLogger("agentmesh.security")

BUNDLE_KEY = "pub.bundle"
_REVOKED = "pub.revoked."
_ISSUED = "ca.issued."
_TOKEN = "ca.token."
_BLOCK = "ca.block."
#: Entries tied to a certificate outlive it a little: clocks differ between machines.
_SLACK = 300.0


def security_bucket(registry_bucket: str) -> str:
    return f"{registry_bucket}_security"


def _ttl_until(when: datetime) -> float:
    return max((when - datetime.now(UTC)).total_seconds() + _SLACK, 1.0)


def _block_key(spiffe_id: str) -> str:
    path = spiffe_id.split("://", 1)[-1].split("/", 1)[-1]
    return _BLOCK + path.replace("/", ".")


class SecurityStore:
    """Typed access to the security bucket."""

    def __init__(self, conn: NatsConnection, bucket: str) -> None:
        self._conn = conn
        self.bucket = bucket
        self._kv: KeyValue | None = None

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RegistryUnavailable(f"security bucket {self.bucket!r}: not opened")
        return self._kv

    async def open(self) -> None:
        """Create the bucket if needed (idempotent; a second call keeps the first handle)."""
        if self._kv is not None:
            return
        js = self._conn.client.jetstream()
        try:
            self._kv = await self._conn.through_election(
                lambda: js.create_key_value(
                    bucket=self.bucket,
                    replicas=self._conn.replicas(),
                    history=1,
                    limit_marker_ttl=1.0,
                    description="agentmesh security: trust bundle, revocations, issued "
                    "certificates",
                ),
                f"opening security bucket {self.bucket!r}",
            )
        except nats.js.errors.BadRequestError:
            self._kv = await self._conn.through_election(
                lambda: js.key_value(self.bucket), f"opening security bucket {self.bucket!r}"
            )
        except Exception as exc:
            raise RegistryUnavailable(
                f"security bucket {self.bucket!r} on NATS at {self._conn.url}: {exc}"
            ) from exc

    async def _put(self, key: str, data: bytes, ttl: float | None = None) -> int:
        async def put() -> int:  # a plain put: repeating it after a timeout is harmless
            if ttl is None:
                return int(await self.kv.put(key, data))
            # A per-message TTL needs a plain publish (KV put has no TTL parameter).
            ack = await self._conn.client.jetstream().publish(
                f"$KV.{self.bucket}.{key}", data, msg_ttl=max(int(ttl + 0.999), 1)
            )
            return int(ack.seq)

        try:
            return await self._conn.through_election(put, f"writing {key}")
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"writing {key} to {self.bucket!r}: {exc}") from exc

    async def _get(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self.kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"reading {key} from {self.bucket!r}: {exc}") from exc
        return entry.value or b"", int(entry.revision or 0)

    async def _values(self, prefix: str) -> list[bytes]:
        try:
            watcher = await self.kv.watch(f"{prefix}>", ignore_deletes=True)
        except (nats.errors.Error, OSError) as exc:
            raise RegistryUnavailable(f"listing {prefix}* in {self.bucket!r}: {exc}") from exc
        out: list[bytes] = []
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.value:
                    out.append(entry.value)
                if entry.delta == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        return out

    # ---- trust bundle ---------------------------------------------------------------------

    async def bundle(self) -> TrustBundle | None:
        found = await self._get(BUNDLE_KEY)
        if found is None:
            return None
        try:
            return TrustBundle.model_validate_json(found[0])
        except ValidationError:
            _log.warning("ignoring a malformed trust bundle in %s", self.bucket)
            return None

    async def put_bundle(self, bundle: TrustBundle) -> None:
        await self._put(BUNDLE_KEY, bundle.model_dump_json().encode())

    # ---- issued certificates and revocations ------------------------------------------------

    async def record_issued(self, record: IdentityRecord) -> None:
        await self._put(
            _ISSUED + record.serial, record.model_dump_json().encode(), _ttl_until(record.not_after)
        )

    async def issued(self) -> list[IdentityRecord]:
        out = []
        for value in await self._values(_ISSUED):
            with contextlib.suppress(ValidationError):
                out.append(IdentityRecord.model_validate_json(value))
        return out

    async def revoke(self, revocation: Revocation) -> None:
        await self._put(
            _REVOKED + revocation.serial,
            revocation.model_dump_json().encode(),
            _ttl_until(revocation.not_after),
        )

    async def revocations(self) -> list[Revocation]:
        out = []
        for value in await self._values(_REVOKED):
            with contextlib.suppress(ValidationError):
                out.append(Revocation.model_validate_json(value))
        return out

    async def is_revoked(self, serial: str) -> bool:
        return await self._get(_REVOKED + serial) is not None

    async def block(self, block: IdentityBlock) -> None:
        await self._put(_block_key(block.spiffe_id), block.model_dump_json().encode())

    async def blocked_since(self, spiffe_id: str) -> datetime | None:
        found = await self._get(_block_key(spiffe_id))
        if found is None:
            return None
        try:
            return IdentityBlock.model_validate_json(found[0]).at
        except ValidationError:
            return None

    # ---- join tokens -----------------------------------------------------------------------

    async def add_token(self, digest: str, token: StoredToken) -> None:
        ttl = None if token.expires_at is None else _ttl_until(token.expires_at) - _SLACK
        await self._put(_TOKEN + digest, token.model_dump_json().encode(), ttl)

    async def use_token(self, digest: str) -> StoredToken:
        """Spend one use of a token (compare-and-set, so two enrolments cannot share the last)."""
        for _ in range(10):
            found = await self._get(_TOKEN + digest)
            if found is None:
                raise AuthenticationFailed("join token is unknown, expired or used up")
            value, revision = found
            try:
                token = StoredToken.model_validate_json(value)
            except ValidationError:
                raise AuthenticationFailed("join token record is unreadable") from None
            if token.expires_at is not None and token.expires_at <= datetime.now(UTC):
                raise AuthenticationFailed("join token has expired")
            if token.uses is None:
                return token
            try:
                if token.uses <= 1:
                    await self.kv.delete(_TOKEN + digest, last=revision)
                else:
                    left = token.model_copy(update={"uses": token.uses - 1})
                    await self.kv.update(_TOKEN + digest, left.model_dump_json().encode(), revision)
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


class SecurityView:
    """What every sidecar keeps of the bucket: revoked serials and the latest trust bundle.

    Watch-fed like the registry index: after every (re)connection a full snapshot replaces the
    view, so a revocation that expired while we were away does not linger. While NATS is gone,
    the last view stays (revocations keep being enforced).
    """

    def __init__(self) -> None:
        self.revoked: frozenset[int] = frozenset()
        self.bundle: TrustBundle | None = None
        self.synced = asyncio.Event()
        self._revoked: dict[str, int] = {}
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._watcher: Any = None

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def start(self, store: SecurityStore, conn: NatsConnection) -> None:
        conn.on_reconnect(self._stop_watcher)
        self._task = asyncio.create_task(self._run(store), name="security-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._stop_watcher()

    async def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _apply(self, key: str, value: bytes | None, *, notify: bool = True) -> None:
        if key == BUNDLE_KEY:
            if value is not None:
                try:
                    self.bundle = TrustBundle.model_validate_json(value)
                except ValidationError:
                    _log.warning("ignoring a malformed trust bundle")
        elif key.startswith(_REVOKED):
            serial = key[len(_REVOKED) :]
            if value is None:
                self._revoked.pop(serial, None)
            else:
                try:
                    self._revoked[serial] = int(serial, 16)
                except ValueError:
                    return
            self.revoked = frozenset(self._revoked.values())
        if notify:
            self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                _log.exception("security view listener failed")

    async def _run(self, store: SecurityStore) -> None:
        backoff = 0.1
        while True:
            try:
                self._watcher = watcher = await store.kv.watch("pub.>")
                await self._consume(watcher)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("security watch interrupted (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _consume(self, watcher: Any) -> None:
        snapshot: dict[str, bytes] | None = {}
        async for entry in watcher:
            if entry is not None:
                value = None if entry.operation in ("DEL", "PURGE") else (entry.value or b"")
                if snapshot is None:
                    self._apply(entry.key, value)
                    continue
                if value is None:
                    snapshot.pop(entry.key, None)
                else:
                    snapshot[entry.key] = value
            if snapshot is not None and (entry is None or entry.delta == 0):
                self._revoked = {}
                for key, data in snapshot.items():
                    self._apply(key, data, notify=False)
                self.revoked = frozenset(self._revoked.values())
                snapshot = None
                self.synced.set()
                self._notify()
