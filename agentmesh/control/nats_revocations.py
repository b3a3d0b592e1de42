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

The embedded server's configuration is rewritten with each new account JWT as well
(:meth:`NatsRevocations.keep_in_config`), so its reloads (TLS renewal) and restarts keep them.

With an operator's own NATS users (``AGENTMESH_NATS_CREDS_FILE`` ...) the server does not trust
the mesh's operator, and this is off: revocation reaches NATS when the JWT expires.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import nats.errors

from agentmesh.errors import MeshError
from agentmesh.models import RevocationList
from agentmesh.registry.connection import NatsConnection
from agentmesh.security.nats_auth import NatsAuthority
from agentmesh.security.nats_client import nats_credentials, signed_by
from agentmesh.security.workload import WorkloadIdentity
from agentmesh.settings import Settings

__all__ = ["NatsRevocations", "revoked_keys"]

_log = logging.getLogger("agentmesh.control")
#: Seconds a server has to answer a claims update (it only re-reads its clients' JWTs).
_UPDATE_TIMEOUT = 5.0


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
        self._keys: dict[str, int] | None = None
        self._jwt = ""
        self._config: Callable[[str], object] | None = None

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

    async def start(self, revocations: RevocationList) -> None:
        """Connect and push; again each time the connection comes back."""
        await self._conn.connect()
        self._conn.on_reconnect(self._send)
        await self.push(revocations)

    async def push(self, revocations: RevocationList) -> None:
        """Have the server(s) refuse the revoked NATS keys (the same JWT is a no-op)."""
        keys = revoked_keys(revocations)
        if keys != self._keys:
            self._keys, self._jwt = keys, self._authority.account_jwt(keys)
            if self._config is not None:
                try:
                    self._config(self._jwt)
                except OSError as exc:  # the running server still gets them, below
                    _log.warning("revocations not written into the NATS configuration: %s", exc)
        await self._send()

    async def _send(self) -> None:
        subject = f"$SYS.REQ.ACCOUNT.{self._authority.account.public}.CLAIMS.UPDATE"
        try:
            reply = await self._conn.client.request(
                subject, self._jwt.encode("ascii"), timeout=_UPDATE_TIMEOUT
            )
            answer = json.loads(reply.data)
        except (MeshError, nats.errors.Error, TimeoutError, ValueError, OSError) as exc:
            _log.warning(
                "could not hand the revocation list to NATS at %s (%s); retrying at the next "
                "guard tick. Sidecars refuse revoked certificates meanwhile",
                self._conn.url,
                exc or type(exc).__name__,
            )
            return
        error = answer.get("error") if isinstance(answer, dict) else None
        if error:
            _log.warning("NATS refused the mesh account's revocations: %s", error)

    async def close(self) -> None:
        await self._conn.close()
