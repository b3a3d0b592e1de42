"""Mesh identities: SPIFFE IDs, and what a verified peer certificate says about its holder.

A workload's identity is the one URI SAN of its X.509 certificate (an X.509-SVID):
``spiffe://<trust-domain>/agent/<name>`` for agents, ``spiffe://<trust-domain>/client/<name>``
for orchestration code and the CLI (``agentmesh.connect()``), ``spiffe://<trust-domain>/control``
for the control plane. Nothing else identifies a caller: never a header, never an IP address.

:func:`check_leaf` is the one place that decides whether a certificate (already chained to the
trust bundle by OpenSSL) is a valid mesh identity; inbound and outbound both call it.
cryptography is imported by the functions that read certificates (once per connection), not
here: every agent imports this module, and with mTLS off nothing reads a certificate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "ROLES",
    "TRUST_DOMAIN_PATTERN",
    "Caller",
    "LeafRefused",
    "SpiffeId",
    "check_leaf",
    "spiffe_ids_of",
]

#: Trust domains are DNS-like names (SPIFFE allows ``_`` too; we keep them valid in TLS SNI).
TRUST_DOMAIN_PATTERN = r"^[a-z0-9](?:[a-z0-9.-]{0,253}[a-z0-9])?$"
_TRUST_DOMAIN_RE = re.compile(TRUST_DOMAIN_PATTERN)
#: Agent names are DNS labels (``models.AGENT_NAME_PATTERN``); client names a little freer.
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")

Kind = Literal["agent", "client", "control"]
#: The kinds that are not agents. Sidecars name themselves by them on the telemetry subjects
#: (``agentmesh.stats.<bucket>.client``) where agents use their names, so no agent is named so.
ROLES = frozenset({"client", "control"})


class LeafRefused(ValueError):
    """A certificate that chains to the bundle but is not a valid mesh identity."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """``spiffe://<trust_domain>/<kind>/<name>`` (``/control`` has no name)."""

    trust_domain: str
    kind: Kind
    name: str = ""

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN_RE.match(self.trust_domain):
            raise ValueError(f"trust domain {self.trust_domain!r} is not a DNS-like name")
        if self.kind == "control":
            if self.name:
                raise ValueError("the control plane's identity has no name")
        elif not _NAME_RE.match(self.name):
            raise ValueError(
                f"{self.kind} name {self.name!r} must be 1-64 lowercase letters, digits, '.', "
                "'_' or '-', starting and ending with a letter or digit"
            )

    @property
    def uri(self) -> str:
        path = "control" if self.kind == "control" else f"{self.kind}/{self.name}"
        return f"spiffe://{self.trust_domain}/{path}"

    def __str__(self) -> str:
        return self.uri

    @property
    def label(self) -> str:
        """What metrics and logs call this workload: the agent's name, else its kind.

        Client names (users, hosts) are unbounded, so they never become a metric label.
        """
        return self.name if self.kind == "agent" else self.kind

    @property
    def sni(self) -> str:
        """A TLS server name that stands for this identity (sent by callers; informational)."""
        return f"{self.name}.{self.kind}.{self.trust_domain}" if self.name else self.trust_domain

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """``spiffe://td/agent/name`` → SpiffeId; ValueError naming what is wrong."""
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri!r} is not a spiffe:// URI")
        rest = uri[len(prefix) :]
        trust_domain, _, path = rest.partition("/")
        parts = path.split("/") if path else []
        if parts == ["control"]:
            return cls(trust_domain, "control")
        if len(parts) != 2 or parts[0] not in ("agent", "client"):
            raise ValueError(
                f"{uri!r}: a mesh identity is spiffe://<trust-domain>/agent/<name>, "
                "…/client/<name> or …/control"
            )
        kind: Kind = "agent" if parts[0] == "agent" else "client"
        return cls(trust_domain, kind, parts[1])

    @classmethod
    def agent(cls, trust_domain: str, name: str) -> SpiffeId:
        return cls(trust_domain, "agent", name)

    @classmethod
    def client(cls, trust_domain: str, name: str) -> SpiffeId:
        return cls(trust_domain, "client", name)


@dataclass(frozen=True, slots=True)
class Caller:
    """A peer whose certificate was verified on this very connection (one TLS hop).

    Built once per connection, when the handshake completes; every request on the connection
    shares it. ``serial`` and ``not_after`` let the inbound refuse revoked or expired
    certificates per request without parsing anything again.
    """

    id: SpiffeId
    serial: int
    not_after: float
    """Expiry, seconds since the epoch."""

    @property
    def spiffe_id(self) -> str:
        return self.id.uri

    @property
    def name(self) -> str:
        return self.id.name

    @property
    def kind(self) -> Kind:
        return self.id.kind

    @property
    def label(self) -> str:
        return self.id.label


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    """Every URI SAN of ``cert`` (a mesh identity has exactly one)."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def check_leaf(cert: x509.Certificate | bytes, trust_domain: str) -> Caller:
    """The identity of a leaf certificate OpenSSL already chained to the trust bundle.

    Refuses (:class:`LeafRefused`, with a message saying why) what chain verification lets
    through: a CA certificate used as a leaf, zero or several URI SANs, a SAN that is not a mesh
    SPIFFE ID, another trust domain, a certificate not meant for TLS client and server use, and
    one outside its validity period (checked again here so that callers of this function need
    not trust the order of checks elsewhere).
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if isinstance(cert, bytes):
        try:
            cert = x509.load_der_x509_certificate(cert)
        except ValueError as exc:
            raise LeafRefused(f"unreadable certificate: {exc}") from exc
    serial = cert.serial_number
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise LeafRefused(f"certificate {serial:x} is a CA certificate used as a leaf")
    uris = spiffe_ids_of(cert)
    if len(uris) != 1:
        raise LeafRefused(
            f"certificate {serial:x} has {len(uris)} URI SANs ({', '.join(uris) or 'none'}); "
            "a mesh identity has exactly one"
        )
    try:
        identity = SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise LeafRefused(f"certificate {serial:x}: {exc}") from exc
    if identity.trust_domain != trust_domain:
        raise LeafRefused(
            f"certificate {serial:x} ({identity}) is from trust domain "
            f"{identity.trust_domain!r}, not {trust_domain!r}"
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and not {
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.SERVER_AUTH,
    }.issubset(set(usages)):
        raise LeafRefused(f"certificate {serial:x} ({identity}) is not for TLS client+server")
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise LeafRefused(f"certificate {serial:x} ({identity}) is outside its validity period")
    return Caller(identity, serial, cert.not_valid_after_utc.timestamp())
