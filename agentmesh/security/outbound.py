"""The outbound TLS layer: an aiohttp connector that checks *who* it connected to.

OpenSSL verifies the agent's chain against the trust bundle. Before a single byte of the
request is written, :class:`MeshConnector` then checks the certificate is a valid mesh identity,
is not revoked, and names exactly the agent the registry record was resolved for
(``spiffe://<td>/agent/<record.name>``, which must also equal ``record.identity``): a registry
entry cannot send a call to another agent's address, nor an impostor answer for it.

The expected identity travels with each request as its TLS server name (``server_hostname``,
``<name>.agent.<td>``); aiohttp keys its connection pool by it and by the SSL context, so a
connection checked for one identity is never reused for another, and a renewed certificate
(a new context) is used by new connections while open ones finish their work.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from typing import Any, Protocol

import aiohttp
from aiohttp.client_proto import ResponseHandler

from agentmesh.errors import IdentityMismatch, MeshError, UntrustedPeer
from agentmesh.security.identity import Caller, LeafRefused, SpiffeId, check_leaf

__all__ = ["ClientTLS", "MeshConnector", "PeerRefused"]

_log = logging.getLogger("agentmesh.security")


class ClientTLS(Protocol):
    """What the outbound needs from the sidecar's identity (``WorkloadIdentity``)."""

    @property
    def trust_domain(self) -> str: ...

    @property
    def revoked(self) -> frozenset[int]: ...


class PeerRefused(aiohttp.ClientConnectorError):
    """Raised inside aiohttp's connect; carries the mesh error the transport re-raises."""

    def __init__(self, key: Any, error: MeshError) -> None:
        super().__init__(key, OSError(error.message))
        self.error = error


class MeshConnector(aiohttp.TCPConnector):
    """``TCPConnector`` plus the mesh's identity check on every new TLS connection."""

    def __init__(self, identity: ClientTLS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._identity = identity
        self._expected: dict[str, SpiffeId] = {}
        self._peers: weakref.WeakKeyDictionary[ResponseHandler, Caller] = (
            weakref.WeakKeyDictionary()
        )

    def expect(self, identity: SpiffeId) -> str:
        """The server name to send for a call that must reach ``identity``."""
        sni = identity.sni
        if sni not in self._expected:
            if len(self._expected) > 4096:
                self._expected.clear()
            self._expected[sni] = identity
        return sni

    async def _wrap_create_connection(
        self, *args: Any, req: Any, **kwargs: Any
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        # aiohttp's own hook for a new connection (3.10+): the TLS handshake is done, no byte
        # of the request has been written yet.
        transport, proto = await super()._wrap_create_connection(*args, req=req, **kwargs)
        if kwargs.get("ssl"):
            expected = self._expected.get(kwargs.get("server_hostname") or "")
            try:
                peer = self.check(transport.get_extra_info("ssl_object"), expected)
            except MeshError as error:
                transport.close()
                raise PeerRefused(req.connection_key, error) from None
            self._peers[proto] = peer
        return transport, proto

    def check(self, ssl_object: ssl.SSLObject | None, expected: SpiffeId | None) -> Caller:
        if ssl_object is None or (der := ssl_object.getpeercert(binary_form=True)) is None:
            raise UntrustedPeer("it presented no certificate")
        try:
            peer = check_leaf(der, self._identity.trust_domain)
        except LeafRefused as exc:
            _log.warning("refusing a TLS peer: %s", exc)
            raise UntrustedPeer(f"its certificate is not a valid mesh identity: {exc}") from None
        if expected is not None and peer.id != expected:
            _log.warning(
                "refusing a TLS peer: it presented %s, expected %s", peer.spiffe_id, expected
            )
            raise IdentityMismatch(
                f"it presented the identity {peer.spiffe_id}, but its registry record is agent "
                f"{expected.name!r} ({expected}): refusing to send the call"
            )
        if peer.serial in self._identity.revoked:
            raise UntrustedPeer(f"its certificate {peer.serial:x} ({peer.spiffe_id}) is revoked")
        return peer

    def drop_revoked(self, revoked: frozenset[int]) -> int:
        """Stop using connections whose peer was revoked; returns how many.

        Idle pooled connections close at once; one carrying a call finishes that call (it was
        sent before we knew) and closes instead of going back to the pool.
        """
        closed = 0
        for proto, peer in list(self._peers.items()):
            if peer.serial in revoked and proto.transport is not None:
                if proto in self._acquired:
                    proto.force_close()
                else:
                    proto.close()
                closed += 1
        return closed
