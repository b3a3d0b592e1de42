"""The outbound TLS check: *who* a new connection reached, before it carries a request.

OpenSSL verifies the agent's chain against the trust bundle. Before a single byte of the
request is written, :class:`PeerVerifier` then checks the certificate is a valid mesh identity,
is not revoked, and names exactly the agent the registry record was resolved for
(``spiffe://<td>/agent/<record.name>``, which must also equal ``record.identity``): a registry
entry cannot send a call to another agent's address, nor an impostor answer for it.

The expected identity travels with each request as its TLS server name (``server_hostname``,
``<name>.agent.<td>``); the transport's pool keys connections by it and by the SSL context, so a
connection checked for one identity is never reused for another.
"""

from __future__ import annotations

import logging
import ssl
from typing import Protocol

from agentmesh.errors import IdentityMismatch, UntrustedPeer
from agentmesh.security.identity import Caller, LeafRefused, SpiffeId, check_leaf

__all__ = ["ClientTLS", "PeerVerifier"]

_log = logging.getLogger("agentmesh.security")


class ClientTLS(Protocol):
    """What the outbound needs from the sidecar's identity (``WorkloadIdentity``)."""

    @property
    def trust_domain(self) -> str: ...

    @property
    def revoked(self) -> frozenset[int]: ...


class PeerVerifier:
    """The mesh's identity check on every new TLS connection (the pool's ``verify``)."""

    def __init__(self, identity: ClientTLS) -> None:
        self._identity = identity
        self._expected: dict[str, SpiffeId] = {}

    def expect(self, identity: SpiffeId) -> str:
        """The server name to send for a call that must reach ``identity``.

        Remembered for good (one entry per agent name this sidecar calls): a connection whose
        server name was never expected is refused, so forgetting would break calls."""
        sni = identity.sni
        self._expected.setdefault(sni, identity)
        return sni

    def __call__(self, ssl_object: ssl.SSLObject | None, server_hostname: str | None) -> Caller:
        """The verified peer of a fresh connection; raises a mesh error to refuse it."""
        expected = self._expected.get(server_hostname or "")
        if expected is None:  # fail closed: every mesh call says whom it must reach
            raise UntrustedPeer(f"no mesh identity is expected behind {server_hostname!r}")
        return self.check(ssl_object, expected)

    def check(self, ssl_object: ssl.SSLObject | None, expected: SpiffeId) -> Caller:
        if ssl_object is None or (der := ssl_object.getpeercert(binary_form=True)) is None:
            raise UntrustedPeer("it presented no certificate")
        try:
            peer = check_leaf(der, self._identity.trust_domain)
        except LeafRefused as exc:
            _log.warning("refusing a TLS peer: %s", exc)
            raise UntrustedPeer(f"its certificate is not a valid mesh identity: {exc}") from None
        if peer.id != expected:
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
