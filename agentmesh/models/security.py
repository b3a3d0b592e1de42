"""Identities and trust: certificates and their requests, join tokens, the trust bundle,
revocations, and the signed state the control plane vouches for.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, model_validator

from agentmesh.models._base import AGENT_NAME_PATTERN, RequestBody, Wire

__all__ = [
    "BundleSignature",
    "CertificateRequest",
    "IdentityBlock",
    "IdentityRecord",
    "IssuedCertificate",
    "JoinToken",
    "JoinTokenRequest",
    "RenewalProof",
    "Revocation",
    "RevocationList",
    "RevocationRequest",
    "RevocationResult",
    "SignedState",
    "StoredToken",
    "TrustBundle",
]


class BundleSignature(Wire):
    """One signature over a :class:`TrustBundle`, by a root or a CA chaining to one."""

    signer: str = Field(description="PEM certificate whose key made the signature")
    chain: list[str] = Field(
        default_factory=list, description="PEM certificates from the signer up to a root"
    )
    signature: str = Field(description="Base64 signature (ECDSA or RSA, SHA-256)")


class TrustBundle(Wire):
    """The CA roots every sidecar trusts, versioned and signed.

    Published at ``GET /v1/trust-bundle`` and in the security KV bucket; a sidecar takes a newer
    version only if a root it already trusts signed it, so root rotation reaches everyone while a
    writer of the bucket cannot add a root of its own.
    """

    trust_domain: str
    version: int = Field(ge=1)
    roots: list[str] = Field(min_length=1, description="PEM root certificates")
    issued_at: datetime
    signatures: list[BundleSignature] = Field(default_factory=list)


class RenewalProof(Wire):
    """Renewal is authenticated by the current certificate and its key, not the join token."""

    certificate: str = Field(description="PEM: the current leaf, then its intermediates")
    timestamp: datetime
    signature: str = Field(
        description="Base64 signature by the current key over the new CSR and the timestamp"
    )


class CertificateRequest(RequestBody):
    """``POST /v1/certificates``: a CSR plus either a join token or a renewal proof."""

    csr: str = Field(max_length=16384, description="PEM CSR with one URI SAN: the SPIFFE ID")
    token: str | None = Field(default=None, max_length=512)
    renewal: RenewalProof | None = None
    nats_key: str | None = Field(
        default=None,
        pattern=r"^U[A-Z2-7]{55}$",
        description="Public user NKEY of the requester: the answer then carries a NATS user JWT "
        "bound to it, with this identity's NATS permissions",
    )


class IssuedCertificate(Wire):
    """What the CA answers: the certificate, its chain, and the trust bundle."""

    spiffe_id: str
    serial: str = Field(description="Hexadecimal serial number")
    certificate: str = Field(description="PEM leaf certificate")
    chain: list[str] = Field(default_factory=list, description="PEM intermediates, if any")
    not_after: datetime
    trust_bundle: TrustBundle
    nats_jwt: str | None = Field(
        default=None, description="NATS user JWT for the request's nats_key (same expiry)"
    )


class JoinTokenRequest(RequestBody):
    """``POST /v1/tokens``: a token that lets one agent (or client) name enrol."""

    agent: str | None = Field(default=None, pattern=AGENT_NAME_PATTERN)
    client: str | None = Field(default=None, max_length=64)
    ttl: float = Field(default=3600.0, gt=0, le=30 * 86400, description="Seconds it stays valid")
    uses: int | None = Field(
        default=1, ge=1, description="Enrolments it allows (null: any number within its TTL)"
    )

    @model_validator(mode="after")
    def _one_subject(self) -> JoinTokenRequest:
        if (self.agent is None) == (self.client is None):
            raise ValueError("give exactly one of agent or client")
        return self


class JoinToken(Wire):
    """A join token as created; the secret is shown once and stored only as a hash."""

    token: str
    identity: str = Field(description="The SPIFFE ID it enrols, or a pattern ending in '*'")
    expires_at: datetime | None = None
    uses: int | None = None


class StoredToken(Wire):
    """A join token as the control plane keeps it in KV, under the hash of its secret."""

    digest: str = Field(description="SHA-256 of the secret: the key it is stored under")
    identity: str
    created_at: datetime
    expires_at: datetime | None = None
    uses: int | None = None


class IdentityRecord(Wire):
    """One certificate the CA issued (``agentmesh identity list``)."""

    spiffe_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    via: Literal["token", "renewal", "local"]
    revoked: bool = False
    nats_key: str | None = Field(
        default=None, description="The public NKEY its NATS user JWT was issued for, if any"
    )


class Revocation(Wire):
    """A revoked certificate: every sidecar refuses it within about a second."""

    serial: str
    spiffe_id: str | None = Field(
        default=None, description="Whose it was; None when revoked by serial with no record of it"
    )
    not_after: datetime = Field(description="Kept in the list until then (plus clock slack)")
    revoked_at: datetime
    reason: str = ""
    nats_key: str | None = Field(
        default=None, description="The NATS user key of its JWT: NATS refuses it too"
    )


class IdentityBlock(Wire):
    """After ``identity revoke NAME``: only tokens created after ``at`` may enrol it again."""

    spiffe_id: str
    at: datetime


class RevocationRequest(RequestBody):
    """``POST /v1/revocations``: a certificate serial (hex), an agent name, or a SPIFFE ID.

    ``kind`` says which ``target`` is; ``auto`` reads it from its syntax (``spiffe://…`` is a
    SPIFFE ID, ``0x…`` a serial, a name with a letter beyond ``f`` or a ``-`` a name) and refuses
    what could be either (``cafe``), so a serial is never taken for a name or the reverse.
    """

    target: str = Field(min_length=1, max_length=256)
    kind: Literal["auto", "serial", "name", "spiffe-id"] = "auto"
    reason: str = Field(default="", max_length=256)


class RevocationList(Wire):
    """Every revocation in force, as one document the control plane signs (``SignedState``).

    One document rather than a key per serial: deleting it, or an entry of it, from NATS changes
    nothing a sidecar enforces (it keeps the last list it verified).
    """

    revoked: list[Revocation] = Field(default_factory=list)
    blocked: list[IdentityBlock] = Field(default_factory=list)


class SignedState(Wire):
    """Mesh state the control plane vouches for: a document, its version, a CA's signature.

    The signature covers ``kind``, ``version`` and the exact ``payload`` bytes (JSON text), so
    a document of one kind can never pass for another. ``version`` only grows: a reader refuses
    one lower than the last it took (a replayed old document).
    """

    kind: Literal["revocations", "policies", "token"]
    version: int = Field(ge=1)
    payload: str = Field(description="The document (RevocationList, PolicySet, StoredToken), JSON")
    signer: str = Field(description="PEM certificate of the signing CA")
    chain: list[str] = Field(default_factory=list, description="PEM certificates up to a root")
    signature: str = Field(description="Base64 signature (ECDSA or RSA, SHA-256)")


class RevocationResult(Wire):
    revoked: list[Revocation]
