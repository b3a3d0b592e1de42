"""Revocation reaches NATS: the mesh account's JWT lists the NATS user keys of revoked certificates.

A user JWT is valid until it expires (with its certificate); NATS's own answer to "sooner" is the
account's ``revocations`` claim (user public NKEY → a time): the server refuses that key's JWTs
issued at or before it, and closes their open connections at once. The servers the mesh
configures (the embedded one, and an operator-run one with ``agentmesh nats-config``) use a
memory resolver: the account is preloaded from the configuration, and replaced at runtime by a
claims update on ``$SYS.REQ.ACCOUNT.<account>.CLAIMS.UPDATE`` from a user of the system account
(every server of a cluster takes it). The control plane holds the system account's key, so it
connects as such a user and pushes the account JWT made from the signed revocation list:

- when the list changes (``agentmesh identity revoke``);
- when its system connection comes back (a restarted server starts from its configuration);
- at every guard tick (``AGENTMESH_STATE_GUARD_INTERVAL``): a reloaded server (SIGHUP) starts
  from its configuration too. The same JWT is pushed again, which a server that has it takes as
  "nothing changed".

Several control planes push, and a server takes any claims update signed by the operator, the
last one winning. So no push may carry an older list than a server holds (:meth:`push`): the JWT
names its list's version; each push reads the newest signed list from KV right before (never a
copy remembered from earlier), asks the server which version it holds
(``$SYS.REQ.ACCOUNT.<account>.INFO``) and does not push an older one; and after the push it reads
KV again: a newer list written meanwhile may have been pushed between that question and our push,
so it is pushed once more. A control plane writes a list to KV before it pushes it, so an older
push can undo a newer one only for the time of that second read.

The embedded server's configuration is rewritten with each new account JWT as well
(:meth:`NatsRevocations.keep_in_config`), so its reloads (TLS renewal) and restarts keep them.

With an operator's own NATS users (``AGENTMESH_NATS_CREDS_FILE`` ...) the server does not trust
the mesh's operator, and this is off: revocation reaches NATS when the JWT expires.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors

from agentmesh.errors import MeshError, RegistryUnavailable
from agentmesh.models import RevocationList
from agentmesh.registry.connection import NatsConnection
from agentmesh.security.nats_auth import NatsAuthority, revocations_version
from agentmesh.security.nats_client import nats_credentials, signed_by
from agentmesh.security.workload import WorkloadIdentity
from agentmesh.settings import Settings

__all__ = ["NatsRevocations", "revoked_keys"]

_log = logging.getLogger("agentmesh.control")
#: Seconds a server has to answer a claims update (it only re-reads its clients' JWTs) or an
#: account info request.
_UPDATE_TIMEOUT = 5.0
#: Pushes in a row when the list keeps changing while it is pushed (each is a revocation).
_PUSH_ROUNDS = 8

#: The newest signed revocation list the control plane has verified, read from KV now:
#: (version, list); the version is never lower than one returned before.
Newest = Callable[[], Awaitable[tuple[int, RevocationList]]]


def revoked_keys(revocations: RevocationList) -> dict[str, int]:
    """NATS user key → revocation time (Unix seconds), from the list in force."""
    keys: dict[str, int] = {}
    for r in revocations.revoked:
        if r.nats_key is not None:
            keys[r.nats_key] = max(keys.get(r.nats_key, 0), int(r.revoked_at.timestamp()))
    return keys


class NatsRevocations:
    """A system-account connection that keeps the server's account claims on our revocations."""

    def __init__(self, authority: NatsAuthority, conn: NatsConnection) -> None:
        self._authority = authority
        self._conn = conn
        self._version: int | None = None
        self._jwt = ""
        self._config: Callable[[str], object] | None = None
        self._newest: Newest | None = None
        #: One push at a time: a change, a reconnection and a guard tick may come together.
        self._pushing = asyncio.Lock()

    def keep_in_config(self, write: Callable[[str], object]) -> None:
        """Also ``write(account JWT)`` into the server's configuration at each change."""
        self._config = write

    @classmethod
    def usable(cls, settings: Settings, conn: NatsConnection) -> bool:
        """Whether the server trusts the mesh's operator: it wants credentials, and we use ours
        (not an operator's own NATS users)."""
        own_users = (
            settings.nats_creds_file is not None
            or settings.nats_nkey_seed_file is not None
            or settings.nats_user is not None
        )
        return not own_users and not conn.unauthenticated

    @classmethod
    def connect_to(
        cls,
        settings: Settings,
        url: str,
        authority: NatsAuthority,
        identity: WorkloadIdentity,
    ) -> NatsRevocations:
        """Not connected yet (:meth:`start`): TLS as the control plane's own connection."""
        system_jwt, key = authority.system_user()
        mesh = nats_credentials(settings, identity)

        def credentials() -> dict[str, Any]:
            options = {k: v for k, v in mesh().items() if k == "tls"}
            return {**options, **signed_by(system_jwt, key)}

        conn = NatsConnection(
            url,
            name="agentmesh-control-revocations",
            ping_interval=settings.nats_ping_interval,
            credentials=credentials,
        )
        return cls(authority, conn)

    async def start(self, newest: Newest) -> None:
        """Connect and push the list ``newest`` reads; again each time the connection comes
        back."""
        self._newest = newest
        await self._conn.connect()
        self._conn.on_reconnect(self.push)
        await self.push()

    async def push(self) -> None:
        """Have the server(s) refuse the revoked NATS keys of the newest signed list, unless
        they hold a newer one (the same JWT is a no-op)."""
        async with self._pushing:
            try:
                await self._push()
            except (MeshError, nats.errors.Error, TimeoutError, ValueError, OSError) as exc:
                _log.warning(
                    "could not hand the revocation list to NATS at %s (%s); retrying at the "
                    "next guard tick. Sidecars refuse revoked certificates meanwhile",
                    self._conn.url,
                    exc or type(exc).__name__,
                )

    async def _push(self) -> None:
        assert self._newest is not None, "start() first"
        version, revocations = await self._newest()
        for _ in range(_PUSH_ROUNDS):
            held = await self._held()
            if held > version:
                _log.info(
                    "NATS holds revocation list v%d, newer than v%d here: not pushed", held, version
                )
                return
            await self._send(self._account_jwt(version, revocations))
            # Another control plane's newer list, pushed between our question and our push,
            # was written to KV before: push it again.
            newer, revocations = await self._newest()
            if newer == version:
                return
            version = newer
        raise RegistryUnavailable("the revocation list kept changing while it was pushed")

    def _account_jwt(self, version: int, revocations: RevocationList) -> str:
        if version != self._version:
            self._version = version
            self._jwt = self._authority.account_jwt(revoked_keys(revocations), version)
            if self._config is not None:
                try:
                    self._config(self._jwt)
                except OSError as exc:  # the running server still gets them
                    _log.warning("revocations not written into the NATS configuration: %s", exc)
        return self._jwt

    async def _held(self) -> int:
        """The version of the list in the account JWT the (first answering) server uses."""
        info = await self._request("INFO", b"")
        data = info.get("data")
        account_jwt = data.get("jwt") if isinstance(data, dict) else None
        return revocations_version(account_jwt) if isinstance(account_jwt, str) else 0

    async def _send(self, account_jwt: str) -> None:
        await self._request("CLAIMS.UPDATE", account_jwt.encode("ascii"))

    async def _request(self, what: str, payload: bytes) -> dict[str, Any]:
        """``$SYS.REQ.ACCOUNT.<mesh account>.<what>``: the server's answer (MeshError if it is
        an error)."""
        subject = f"$SYS.REQ.ACCOUNT.{self._authority.account.public}.{what}"
        reply = await self._conn.client.request(subject, payload, timeout=_UPDATE_TIMEOUT)
        answer = json.loads(reply.data)
        error = answer.get("error") if isinstance(answer, dict) else "not an object"
        if error or not isinstance(answer, dict):
            raise RegistryUnavailable(f"NATS answered {subject}: {error}")
        return answer

    async def close(self) -> None:
        await self._conn.close()
