"""The mesh CA: creates or loads its keys, issues short-lived SPIFFE certificates, rotates roots.

Two ways to run it:

- **self-managed** (the default): on first start the control plane creates an EC P-256 root in
  ``<data dir>/ca/`` (key files mode 0600, directory 0700) and signs leaves with it;
  ``agentmesh ca rotate`` makes a new root and publishes a bundle with *both* roots, signed by
  both keys, so every sidecar trusts the new root before any leaf under it exists. The old root
  stays in the bundle until the last leaf it signed has expired, then leaves it; its key is
  deleted at rotation (it is needed only to sign that one bundle).
- **operator-supplied**: ``AGENTMESH_CA_CERT_FILE`` / ``AGENTMESH_CA_KEY_FILE`` name a CA
  (typically an intermediate under the operator's own root): the file holds the signing
  certificate, then its chain up to and including the root. The bundle is the root(s) in that
  file; rotating means giving the control plane a new intermediate.

Files of the self-managed CA: ``ca.json`` (trust domain, current root, roots being retired, the
signed bundle) is the commit point of every change; ``<fingerprint>.pem`` / ``.key`` per root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ValidationError

from agentmesh.errors import ConfigurationError, Conflict
from agentmesh.models import SignedState, TrustBundle
from agentmesh.security.files import check_private, write_private
from agentmesh.security.identity import SpiffeId
from agentmesh.security.pki import (
    PrivateKey,
    fingerprint,
    key_pem,
    load_certs,
    load_key,
    new_key,
    pem,
    same_public_key,
    sign_bundle,
)
from agentmesh.security.signed import Kind, sign_state
from agentmesh.settings import Settings

__all__ = ["CertificateAuthority", "ca_certificate", "write_root_ca"]

#: Leaves are valid from a little before they were issued: clocks differ between machines.
NOT_BEFORE_SKEW = timedelta(seconds=30)
ROOT_LIFETIME = timedelta(days=3650)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures, and for a CA signing certificates (and CRLs) too."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def ca_certificate(
    subject: str,
    key: PrivateKey,
    *,
    issuer: tuple[x509.Certificate, PrivateKey] | None,
    path_length: int,
    lifetime: timedelta,
) -> x509.Certificate:
    """A CA certificate (``O=agentmesh, CN=subject``) for ``key``: self-signed when ``issuer``
    is None (a root), else signed by ``issuer`` (its certificate and key: an intermediate).
    ``path_length``: how many CAs may follow below it (0: it signs leaves only)."""
    now = datetime.now(UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agentmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = (
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        if issuer is None
        else _authority_key_id(issuer[0])
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - NOT_BEFORE_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .sign(key if issuer is None else issuer[1], hashes.SHA256())
    )


def _new_root(key: PrivateKey, trust_domain: str) -> x509.Certificate:
    now = datetime.now(UTC)
    subject = f"agentmesh root {trust_domain[:30]} {now:%Y%m%d%H%M%S}-{secrets.token_hex(2)}"
    return ca_certificate(subject, key, issuer=None, path_length=0, lifetime=ROOT_LIFETIME)


def write_root_ca(directory: Path, trust_domain: str) -> tuple[Path, Path]:
    """A fresh root CA as ``ca.pem`` + ``ca.key`` (0600): for AGENTMESH_CA_CERT_FILE/KEY_FILE."""
    key = new_key()
    cert = _new_root(key, trust_domain)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    write_private(key_path, key_pem(key))
    cert_path.write_text(pem(cert))
    return cert_path, key_path


@dataclass(slots=True)
class _Retiring:
    root: x509.Certificate
    retire_after: datetime


class CertificateAuthority:
    """Issues leaf certificates; owns the signed trust bundle."""

    def __init__(
        self,
        *,
        trust_domain: str,
        key: PrivateKey,
        signer: x509.Certificate,
        chain: list[x509.Certificate],
        roots: list[x509.Certificate],
        ttl: float,
        directory: Path | None = None,
        bundle: TrustBundle | None = None,
        retiring: list[_Retiring] | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self._key = key
        self.signer = signer
        self.chain = chain
        self.roots = roots
        self.ttl = ttl
        self.directory = directory
        self.retiring = retiring or []
        self._bundle = bundle or self._signed(1)

    # ---- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: Settings) -> CertificateAuthority:
        """The CA the settings name: operator files, else the one in the data dir (created)."""
        if settings.ca_cert_file is not None and settings.ca_key_file is not None:
            return cls.from_files(
                settings.ca_cert_file,
                settings.ca_key_file,
                settings.trust_domain,
                settings.cert_ttl,
            )
        return cls.in_directory(settings.data_dir / "ca", settings.trust_domain, settings.cert_ttl)

    @classmethod
    def from_files(
        cls, cert_file: Path, key_file: Path, trust_domain: str, ttl: float
    ) -> CertificateAuthority:
        check_private(key_file)
        try:
            certs = load_certs(cert_file.read_bytes())
            key = load_key(key_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot load the CA from {cert_file} / {key_file}: {exc}"
            ) from exc
        if not certs:
            raise ConfigurationError(f"{cert_file}: no certificate in it")
        signer, rest = certs[0], certs[1:]
        if not same_public_key(signer.public_key(), key.public_key()):
            raise ConfigurationError(
                f"{key_file} is not the key of the first certificate in {cert_file}"
            )
        _require_ca(signer, cert_file)
        roots = [c for c in certs if c.issuer == c.subject]
        if not roots:
            raise ConfigurationError(
                f"{cert_file} must end with the root certificate (the chain up to the root)"
            )
        chain = [c for c in rest if c.issuer != c.subject]
        return cls(
            trust_domain=trust_domain, key=key, signer=signer, chain=chain, roots=roots, ttl=ttl
        )

    @classmethod
    def in_directory(cls, directory: Path, trust_domain: str, ttl: float) -> CertificateAuthority:
        state_file = directory / "ca.json"
        if not state_file.exists():
            return cls._create(directory, trust_domain, ttl)
        try:
            state = json.loads(state_file.read_text())
            current = state["current"]
            check_private(directory / f"{current}.key")
            cert = load_certs((directory / f"{current}.pem").read_bytes())[0]
            key = load_key((directory / f"{current}.key").read_bytes())
            retiring = [
                _Retiring(load_certs(r["pem"])[0], datetime.fromisoformat(r["retire_after"]))
                for r in state.get("retiring", [])
            ]
            bundle = TrustBundle.model_validate(state["bundle"])
        except (OSError, KeyError, ValueError, ValidationError) as exc:
            raise ConfigurationError(f"the CA in {directory} is unreadable: {exc}") from exc
        if state.get("trust_domain") != trust_domain:
            raise ConfigurationError(
                f"the CA in {directory} was created for trust domain "
                f"{state.get('trust_domain')!r}, but AGENTMESH_TRUST_DOMAIN is {trust_domain!r}"
            )
        ca = cls(
            trust_domain=trust_domain,
            key=key,
            signer=cert,
            chain=[],
            roots=[cert, *(r.root for r in retiring)],
            ttl=ttl,
            directory=directory,
            bundle=bundle,
            retiring=retiring,
        )
        ca._clean_keys()
        return ca

    @classmethod
    def _create(cls, directory: Path, trust_domain: str, ttl: float) -> CertificateAuthority:
        key = new_key()
        root = _new_root(key, trust_domain)
        ca = cls(
            trust_domain=trust_domain,
            key=key,
            signer=root,
            chain=[],
            roots=[root],
            ttl=ttl,
            directory=directory,
        )
        ca._save_root(root, key)
        ca._commit()
        return ca

    # ---- state ----------------------------------------------------------------------------------

    @property
    def self_managed(self) -> bool:
        return self.directory is not None

    @property
    def bundle(self) -> TrustBundle:
        return self._bundle

    def _signed(
        self,
        version: int,
        extra_signers: Sequence[tuple[PrivateKey, x509.Certificate]] = (),
    ) -> TrustBundle:
        bundle = TrustBundle(
            trust_domain=self.trust_domain,
            version=version,
            roots=[pem(r) for r in self.roots],
            issued_at=datetime.now(UTC),
        )
        for key, cert in extra_signers:
            bundle = sign_bundle(bundle, key, cert)
        return sign_bundle(bundle, self._key, self.signer, self.chain)

    def adopt_version(self, published: TrustBundle | None) -> bool:
        """Line up with the bundle already in KV; True when ours must be (re)published.

        Sidecars take only a *newer* version, so a bundle in KV that is ahead of ours (a crash
        in the middle of a rotation, or an operator-supplied CA that keeps no state) makes us
        re-sign ours with the next version.
        """
        if published is None:
            return True
        same = published.roots == self._bundle.roots
        if same and published.version == self._bundle.version:
            return False
        if not self.self_managed and same:
            self._bundle = published
            return False
        if self.self_managed and published.version < self._bundle.version:
            return True
        self._bundle = self._signed(published.version + 1)
        if self.self_managed:
            self._commit()
        return True

    def _save_root(self, root: x509.Certificate, key: PrivateKey) -> None:
        assert self.directory is not None
        name = fingerprint(root)[:32]
        write_private(self.directory / f"{name}.key", key_pem(key))
        (self.directory / f"{name}.pem").write_text(pem(root))

    def _commit(self) -> None:
        assert self.directory is not None
        state = {
            "trust_domain": self.trust_domain,
            "current": fingerprint(self.signer)[:32],
            "retiring": [
                {"pem": pem(r.root), "retire_after": r.retire_after.isoformat()}
                for r in self.retiring
            ],
            "bundle": self._bundle.model_dump(mode="json"),
        }
        write_private(self.directory / "ca.json", json.dumps(state, indent=2).encode())
        self._clean_keys()

    def _clean_keys(self) -> None:
        """Delete every key file but the current root's (a retired root's key is not needed)."""
        assert self.directory is not None
        keep = fingerprint(self.signer)[:32]
        for path in self.directory.glob("*.key"):
            if path.stem != keep:
                with contextlib.suppress(OSError):
                    path.unlink()

    # ---- issuing ------------------------------------------------------------------------------

    def issue(
        self,
        public_key: object,
        identity: SpiffeId,
        ttl: float | None = None,
        *,
        hosts: Sequence[str] = (),
    ) -> x509.Certificate:
        """A leaf for ``identity`` on ``public_key``: one URI SAN, CA:false, client+server auth.

        ``hosts``: DNS names and IP addresses it also names (the control plane's HTTPS
        certificate, verified by host name like any web server's)."""
        if identity.trust_domain != self.trust_domain:
            raise ValueError(f"{identity} is not in trust domain {self.trust_domain!r}")
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("the CSR's key must be an EC key (P-256 or P-384)")
        if not isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise ValueError(f"the CSR's curve {public_key.curve.name} is not P-256 or P-384")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agentmesh"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.kind),
                x509.NameAttribute(NameOID.COMMON_NAME, identity.name or identity.kind),
            ]
        )
        return self._leaf(
            public_key,
            subject,
            [x509.UniformResourceIdentifier(identity.uri), *map(_host_name, hosts)],
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            min(ttl or self.ttl, self.ttl),
            key_usage=True,
        )

    def issue_server(
        self,
        public_key: PrivateKey,
        hosts: Sequence[str],
        *,
        ttl: float | None = None,
        route: bool = False,
    ) -> x509.Certificate:
        """A TLS *server* certificate for infrastructure (the embedded NATS) on ``hosts``.

        DNS and IP SANs and no URI SAN: it is no mesh identity (``check_leaf`` refuses it as a
        caller), and clients check the host they dialled against it, so no agent's certificate
        can stand in for the server. ``route``: a NATS cluster node's, which also presents it
        as a client to its peers (client-auth usage). ``ttl``: instead of the CA's lifetime.
        """
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        names = [_host_name(host) for host in hosts]
        eku = [ExtendedKeyUsageOID.SERVER_AUTH]
        if route:
            eku.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        lifetime = self.ttl if ttl is None else ttl
        return self._leaf(public_key.public_key(), subject, names, eku, lifetime, key_usage=False)

    def _leaf(
        self,
        public_key: CertificatePublicKeyTypes,
        subject: x509.Name,
        names: list[x509.GeneralName],
        usages: list[x509.ObjectIdentifier],
        lifetime: float,
        *,
        key_usage: bool,
    ) -> x509.Certificate:
        """A CA:false certificate signed by this CA, valid for ``lifetime`` seconds at most
        (never past the signer's own expiry)."""
        now = datetime.now(UTC)
        not_after = min(now + timedelta(seconds=lifetime), self.signer.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.signer.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - NOT_BEFORE_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if key_usage:
            builder = builder.add_extension(_key_usage(ca=False), critical=True)
        return (
            builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_id(self.signer), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def sign_state(self, kind: Kind, version: int, document: BaseModel) -> SignedState:
        """``document`` signed with the key that signs certificates (see security/signed.py)."""
        return sign_state(kind, version, document, self._key, self.signer, self.chain)

    # ---- rotation ------------------------------------------------------------------------------

    def rotate(self) -> TrustBundle:
        """A new root signs from now on; the bundle holds old and new until the old retires.

        The overlap bundle is signed by the old key (sidecars that trust only the old root take
        it) and by the new one; then the old key is deleted.
        """
        if not self.self_managed:
            raise Conflict(
                "this control plane signs with an operator-supplied CA (AGENTMESH_CA_CERT_FILE): "
                "it holds no key of your root, so it cannot make a new root or intermediate. "
                "Rotating it is the operator's job: sign a new intermediate under your root, "
                "point AGENTMESH_CA_CERT_FILE/AGENTMESH_CA_KEY_FILE at it and restart this "
                "control plane (docs/deploy.md, 'Control planes'); the root stays in every "
                "sidecar's trust bundle, so nothing else changes"
            )
        old_key, old_root = self._key, self.signer
        key = new_key()
        root = _new_root(key, self.trust_domain)
        retire_after = datetime.now(UTC) + timedelta(seconds=self.ttl) + NOT_BEFORE_SKEW
        self._save_root(root, key)
        self._key, self.signer = key, root
        self.retiring = [*self.retiring, _Retiring(old_root, retire_after)]
        self.roots = [root, *(r.root for r in self.retiring)]
        self._bundle = self._signed(self._bundle.version + 1, [(old_key, old_root)])
        self._commit()
        return self._bundle

    def retire_due(self) -> TrustBundle | None:
        """Drop roots whose last leaf has expired; the new bundle to publish, if any changed."""
        now = datetime.now(UTC)
        keep = [r for r in self.retiring if r.retire_after > now]
        if len(keep) == len(self.retiring):
            return None
        self.retiring = keep
        self.roots = [self.signer, *(r.root for r in keep)]
        self._bundle = self._signed(self._bundle.version + 1)
        self._commit()
        return self._bundle

    def next_retirement(self) -> datetime | None:
        return min((r.retire_after for r in self.retiring), default=None)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _require_ca(cert: x509.Certificate, where: Path) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigurationError(f"{where}: the first certificate is not a CA certificate")
