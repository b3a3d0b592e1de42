"""Issuing certificates: the CA plus its records in KV (tokens, issued certificates, revocations).

Used by the control plane's API (``/v1/certificates``, ``/v1/tokens``, ``/v1/identities``,
``/v1/revocations``, ``/v1/ca/rotate``) and, for processes that hold the CA files themselves, by
their own sidecar (``issue_local``), so that every certificate is recorded the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agentmesh.control.ca import NOT_BEFORE_SKEW, CertificateAuthority
from agentmesh.control.kept import keep, kept
from agentmesh.errors import (
    AuthenticationFailed,
    InvalidInput,
    MeshError,
    PolicyDenied,
    RegistryUnavailable,
)
from agentmesh.models import (
    CertificateRequest,
    IdentityBlock,
    IdentityRecord,
    IssuedCertificate,
    JoinToken,
    JoinTokenRequest,
    RenewalProof,
    Revocation,
    RevocationList,
    RevocationRequest,
    RevocationResult,
    SignedState,
    StoredToken,
    TrustBundle,
)
from agentmesh.security.enrol import (
    PIN_HEX,
    new_token,
    parse_token,
    renewal_payload,
    token_digest,
)
from agentmesh.security.files import JOIN_TOKEN_FILE, read_secret, write_private
from agentmesh.security.identity import ROLES, LeafRefused, SpiffeId, check_leaf
from agentmesh.security.nats_auth import NatsAuthority
from agentmesh.security.pki import fingerprint, load_certs, pem
from agentmesh.security.signed import StateTrust, next_version
from agentmesh.security.store import REVOCATIONS_KEY, SecurityStore, StateConflict

__all__ = ["Issuer"]

_log = logging.getLogger("agentmesh.control")

#: How far a renewal proof's timestamp may be from our clock.
_PROOF_WINDOW = timedelta(minutes=5)
#: After publishing an overlap bundle, wait this long before signing with the new root, so
#: every sidecar's watch has delivered it (milliseconds in practice) before a leaf under the new
#: root can reach anyone.
ROTATION_PROPAGATION = 2.0
_ANY = "*"
#: Compare-and-set attempts on the revocation list before a revocation gives up.
_CAS_ATTEMPTS = 8
#: Token versions remembered to refuse a replayed older record (cleared when full).
_TOKEN_MEMORY = 10_000
#: Revocations stay listed this long past their certificate's expiry: clocks differ.
_SLACK = timedelta(minutes=5)
_HEX = re.compile(r"^[0-9a-f]{1,40}$")


def _serial(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:x}"


class Issuer:
    def __init__(self, ca: CertificateAuthority, store: SecurityStore) -> None:
        self.ca = ca
        self.store = store
        self._lock = asyncio.Lock()
        self._data_dir: Path | None = None
        #: Checks what the control plane reads back from KV: signed by this mesh's CA.
        self.trust = StateTrust(lambda: self.ca.roots, lambda: self.ca.trust_domain)
        #: The last revocation list verified or written, signed: it stays in force (and is
        #: written back by ``guard``) when NATS loses, forges or rolls back the one it holds.
        self._revocations: tuple[RevocationList, SignedState | None] = (RevocationList(), None)
        self._token_versions: dict[str, int] = {}
        self._kept: Path | None = None
        #: Signs a NATS user JWT into each certificate answer that asks (``nats_key``).
        self.nats: NatsAuthority | None = None
        self._registry_bucket = ""
        #: Called after each change of the revocation list and each guard tick (NATS's own
        #: revocations: ``agentmesh.control.nats_revocations``).
        self._on_revocations: Callable[[], Awaitable[None]] | None = None

    def use_nats(self, authority: NatsAuthority, registry_bucket: str) -> None:
        """Hand out NATS credentials with certificates (the control plane's NATS trusts them)."""
        self.nats, self._registry_bucket = authority, registry_bucket

    def on_revocations(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Call ``listener`` whenever the list changes, and at each guard (it reads the list
        itself: :meth:`signed_revocations`)."""
        self._on_revocations = listener

    async def _revocations_changed(self) -> None:
        if self._on_revocations is not None:
            await self._on_revocations()

    def keep_in(self, directory: Path) -> None:
        """Keep the revocation list in ``directory`` too, and start from the copy kept there."""
        self._kept = directory / "revocations.json"
        value = kept(self._kept)
        if value is None:
            return
        try:
            _, document = self.trust.revocations(value)
        except ValueError as exc:
            _log.warning("ignoring the revocation list kept in %s: %s", self._kept, exc)
            return
        self._revocations = (document, SignedState.model_validate_json(value))

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    # ---- the trust bundle ----------------------------------------------------------------------

    async def publish_bundle(self) -> TrustBundle:
        """Put our bundle into KV unless the same one is already there."""
        if self.ca.adopt_version(await self.store.bundle()):
            await self.store.put_bundle(self.ca.bundle)
        return self.ca.bundle

    async def rotate(self, *, propagation: float | None = None) -> TrustBundle:
        if propagation is None:  # short-lived test certificates must not wait out their life
            propagation = min(ROTATION_PROPAGATION, self.ca.ttl / 10)
        async with self._lock:
            bundle = self.ca.rotate()
            await self.store.put_bundle(bundle)
            _log.info(
                "CA rotated: trust bundle v%d holds %d roots", bundle.version, len(bundle.roots)
            )
            # Enrolments wait on the lock meanwhile; none fails.
            await asyncio.sleep(propagation)
        return bundle

    async def retire_loop(self) -> None:
        """Drop retired roots from the bundle when their last leaf has expired."""
        while True:
            due = self.ca.next_retirement()
            delay = 60.0 if due is None else (due - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(min(max(delay, 0.05), 60.0))
            try:
                async with self._lock:
                    bundle = self.ca.retire_due()
                    if bundle is not None:
                        _log.info("retiring old roots: trust bundle v%d", bundle.version)
                    # Published again until it succeeds (NATS may be away for a while).
                    await self.publish_bundle()
                if bundle is not None and self._data_dir is not None:
                    await self.local_token(self._data_dir)  # it pinned a root that just left
            except MeshError as exc:
                _log.warning("could not publish the trust bundle (%s); retrying", exc)

    # ---- issuing ------------------------------------------------------------------------------

    def _csr(self, text: str) -> tuple[x509.CertificateSigningRequest, SpiffeId]:
        try:
            csr = x509.load_pem_x509_csr(text.encode("ascii"))
        except ValueError as exc:
            raise InvalidInput(f"unreadable CSR: {exc}") from None
        if not csr.is_signature_valid:
            raise InvalidInput("the CSR's signature is invalid")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            raise InvalidInput(
                f"the CSR must name exactly one SPIFFE ID (URI SAN); it has {len(uris)}"
            )
        try:
            identity = SpiffeId.parse(uris[0])
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if identity.trust_domain != self.trust_domain:
            raise PolicyDenied(
                f"{identity} is outside this CA's trust domain {self.trust_domain!r}"
            )
        if identity.kind == "control":
            raise PolicyDenied("the control plane's identity is never issued to others")
        _not_reserved(identity)
        return csr, identity

    async def certificate(self, request: CertificateRequest) -> IssuedCertificate:
        """``POST /v1/certificates``: enrolment (join token) or renewal (current certificate)."""
        csr, identity = self._csr(request.csr)
        via: Literal["token", "renewal", "local"]
        if request.renewal is not None:
            await self._check_renewal(request.renewal, csr, identity)
            via = "renewal"
        elif request.token is not None:
            await self._use_token(request.token, identity)
            via = "token"
        else:
            raise AuthenticationFailed("a join token or a renewal proof is required")
        return await self._issue(csr.public_key(), identity, via, request.nats_key)

    async def issue_local(self, csr_pem: str) -> IssuedCertificate:
        """For a process that holds the CA itself: no token, same records."""
        csr, identity = self._csr(csr_pem)
        return await self._issue(csr.public_key(), identity, "local")

    async def issue_control(self, public_key: object) -> IssuedCertificate:
        """The control plane's own identity, ``spiffe://<td>/control``."""
        return await self._issue(public_key, SpiffeId(self.trust_domain, "control"), "local")

    async def _issue(
        self,
        public_key: object,
        identity: SpiffeId,
        via: Literal["token", "renewal", "local"],
        nats_key: str | None = None,
    ) -> IssuedCertificate:
        async with self._lock:
            try:
                cert = self.ca.issue(public_key, identity)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
            nats_jwt = None
            if self.nats is not None and nats_key is not None:
                try:
                    nats_jwt = self.nats.user_jwt(
                        identity,
                        nats_key,
                        bucket=self._registry_bucket,
                        expires=cert.not_valid_after_utc.timestamp(),
                    )
                except ValueError as exc:
                    raise InvalidInput(str(exc)) from None
            record = IdentityRecord(
                spiffe_id=identity.uri,
                serial=_serial(cert),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                issued_at=datetime.now(UTC),
                via=via,
                nats_key=nats_key if nats_jwt is not None else None,
            )
            await self.store.record_issued(record)
            return IssuedCertificate(
                spiffe_id=identity.uri,
                serial=record.serial,
                certificate=pem(cert),
                chain=([pem(self.ca.signer)] if self.ca.signer not in self.ca.roots else [])
                + [pem(c) for c in self.ca.chain],
                not_after=record.not_after,
                trust_bundle=self.ca.bundle,
                nats_jwt=nats_jwt,
            )

    async def _check_renewal(
        self, proof: RenewalProof, csr: x509.CertificateSigningRequest, identity: SpiffeId
    ) -> None:
        try:
            leaf, *_ = load_certs(proof.certificate)
        except ValueError:
            raise AuthenticationFailed("renewal: the current certificate is unreadable") from None
        issuers = [self.ca.signer, *self.ca.chain, *self.ca.roots]
        if not any(_issued_by(leaf, issuer) for issuer in issuers):
            raise AuthenticationFailed("renewal: the current certificate is not from this CA")
        try:
            current = check_leaf(leaf, self.trust_domain)
        except LeafRefused as exc:
            raise AuthenticationFailed(f"renewal refused: {exc}") from None
        if current.id != identity:
            raise PolicyDenied(f"renewal of {current.spiffe_id} cannot ask for {identity}")
        now = datetime.now(UTC)
        if abs(now - proof.timestamp) > _PROOF_WINDOW:
            raise AuthenticationFailed("renewal: the proof's timestamp is too far from our clock")
        payload = renewal_payload(csr.public_bytes(serialization.Encoding.DER), proof.timestamp)
        try:
            signature = base64.b64decode(proof.signature)
            public = leaf.public_key()
            if isinstance(public, ec.EllipticCurvePublicKey):
                public.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(public, rsa.RSAPublicKey):
                public.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            else:
                raise InvalidSignature
        except (InvalidSignature, ValueError):
            raise AuthenticationFailed(
                "renewal: the proof is not signed by the current certificate's key"
            ) from None
        revocations = await self.revocation_list()
        if any(r.serial == _serial(leaf) for r in revocations.revoked):
            raise AuthenticationFailed(f"renewal: certificate {_serial(leaf)} is revoked")
        blocked = await self.blocked_since(identity.uri)
        if blocked is not None and leaf.not_valid_before_utc + NOT_BEFORE_SKEW <= blocked:
            raise AuthenticationFailed(
                f"renewal: {identity} was revoked at {blocked:%Y-%m-%d %H:%M:%S}"
            )

    async def _use_token(self, token: str, identity: SpiffeId) -> None:
        _, secret = parse_token(token)
        stored = await self.store.use_token(
            token_digest(secret), self._open_token, self._sign_token
        )
        if stored.identity not in (_ANY, identity.uri):
            raise PolicyDenied(f"this join token enrols {stored.identity}, not {identity}")
        blocked = await self.blocked_since(identity.uri)
        if blocked is not None and (stored.identity == _ANY or stored.created_at <= blocked):
            raise PolicyDenied(
                f"{identity} was revoked at {blocked:%Y-%m-%d %H:%M:%S} UTC; only a token "
                f"created after that can enrol it again (agentmesh token create)"
            )

    # ---- tokens ---------------------------------------------------------------------------------

    async def create_token(self, request: JoinTokenRequest) -> JoinToken:
        if request.agent is not None:
            identity = SpiffeId.agent(self.trust_domain, request.agent)
            _not_reserved(identity)
        else:
            try:
                identity = SpiffeId.client(self.trust_domain, request.client or "")
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=request.ttl)
        token, digest = new_token(self.ca.roots[0])
        stored = StoredToken(
            digest=digest,
            identity=identity.uri,
            created_at=now,
            expires_at=expires,
            uses=request.uses,
        )
        await self.store.add_token(digest, self._sign_token(digest, stored), expires)
        return JoinToken(token=token, identity=identity.uri, expires_at=expires, uses=request.uses)

    async def local_token(self, data_dir: Path) -> Path:
        """The data dir's multi-use token for local agents and clients (file 0600).

        Kept across restarts; made anew when the CA it pins has left the bundle.
        """
        self._data_dir = data_dir
        path = data_dir / JOIN_TOKEN_FILE
        token = read_secret(path)
        pins = {_pin(r) for r in self.ca.roots}
        if token is not None:
            with contextlib.suppress(AuthenticationFailed):
                pin, secret = parse_token(token)
                if pin in pins:
                    await self._store_local(token_digest(secret))
                    return path
        token, digest = new_token(self.ca.roots[0])
        await self._store_local(digest)
        write_private(path, token.encode() + b"\n")
        return path

    async def _store_local(self, digest: str) -> None:
        stored = StoredToken(digest=digest, identity=_ANY, created_at=datetime.now(UTC), uses=None)
        await self.store.add_token(digest, self._sign_token(digest, stored), None)

    def _sign_token(self, digest: str, token: StoredToken) -> SignedState:
        version = next_version(self._token_versions.get(digest, 0))
        self._remember_token(digest, version)
        return self.ca.sign_state("token", version, token)

    def _open_token(self, digest: str, value: bytes) -> StoredToken:
        """The one place the control plane decides a token record is its own (ValueError if not).

        Signed by the mesh CA, stored under its own digest (a signed record copied under
        another key is no token), and not older than a version this process wrote or read.
        """
        version, token = self.trust.token(value)
        if token.digest != digest:
            raise ValueError(f"it is the record of token {token.digest[:12]}…, copied")
        if version < self._token_versions.get(digest, 0):
            raise ValueError(
                f"v{version} is older than v{self._token_versions[digest]} (a rollback)"
            )
        self._remember_token(digest, version)
        return token

    def _remember_token(self, digest: str, version: int) -> None:
        if len(self._token_versions) >= _TOKEN_MEMORY:
            self._token_versions.clear()
        self._token_versions[digest] = version

    # ---- identities and revocation ---------------------------------------------------------------

    async def identities(self) -> list[IdentityRecord]:
        revoked = {r.serial for r in (await self.revocation_list()).revoked}
        records = [
            r.model_copy(update={"revoked": r.serial in revoked}) for r in await self.store.issued()
        ]
        return sorted(records, key=lambda r: (r.spiffe_id, r.issued_at))

    async def revocation_list(self) -> RevocationList:
        """The revocation list in force: KV's if the CA signed it and it is not older than ours."""
        return (await self._read_revocations())[0]

    async def signed_revocations(self) -> tuple[int, RevocationList]:
        """(version, list) of the list in force, read from KV now: the newest this control
        plane has verified (0 before any was signed)."""
        await self._read_revocations()
        document, state = self._revocations
        return (state.version if state is not None else 0), document

    async def blocked_since(self, spiffe_id: str) -> datetime | None:
        """When ``spiffe_id`` was last revoked by name (tokens older than that cannot enrol it)."""
        times = [b.at for b in (await self.revocation_list()).blocked if b.spiffe_id == spiffe_id]
        return max(times, default=None)

    async def _read_revocations(self) -> tuple[RevocationList, int | None]:
        """(the list in force, the KV revision to compare-and-set against)."""
        current, state = self._revocations
        found = await self.store.signed(REVOCATIONS_KEY)
        if found is None:
            if state is not None:
                _log.warning(
                    "the revocation list is gone from NATS; v%d stays in force", state.version
                )
            return current, None
        value, revision = found
        try:
            version, document = self.trust.revocations(value)
        except ValueError as exc:
            _log.warning("ignoring the revocation list in NATS: %s", exc)
            return current, revision
        if state is not None and version < state.version:
            _log.warning(
                "ignoring revocation list v%d in NATS: older than v%d (a rollback)",
                version,
                state.version,
            )
            return current, revision
        if state is None or version > state.version:
            self._revocations = (document, SignedState.model_validate_json(value))
            keep(self._kept, self._revocations[1])
        return document, revision

    async def _change_revocations(self, change: Callable[[RevocationList], RevocationList]) -> None:
        """Sign and write ``change(list in force)``, compare-and-set, as a new version."""
        for _ in range(_CAS_ATTEMPTS):
            current, revision = await self._read_revocations()
            previous = self._revocations[1]
            now = datetime.now(UTC)
            changed = change(current)
            document = RevocationList(
                revoked=[r for r in changed.revoked if r.not_after + _SLACK > now],
                blocked=changed.blocked,
            )
            state = self.ca.sign_state(
                "revocations", next_version(previous.version if previous else 0), document
            )
            try:
                await self.store.put_signed(REVOCATIONS_KEY, state, last=revision)
            except StateConflict:
                continue
            self._revocations = (document, state)
            keep(self._kept, state)
            await self._revocations_changed()
            return
        raise RegistryUnavailable("the revocation list kept changing while it was written")

    async def guard(self) -> None:
        """Write the last good revocation list back if NATS lost, forged or rolled it back.

        Sidecars that saw it keep enforcing it anyway; this is for those that start later. The
        list in force is also handed to NATS again (a restarted or reloaded server forgot it).
        """
        await self._guard_revocations()
        await self._revocations_changed()

    async def _guard_revocations(self) -> None:
        _current, state = self._revocations
        if state is None:
            await self._read_revocations()
            return
        found = await self.store.signed(REVOCATIONS_KEY)
        if found is not None and found[0] == state.model_dump_json().encode():
            return
        await self._read_revocations()
        if self._revocations[1] is state:
            _log.warning("restoring revocation list v%d in NATS", state.version)
            with contextlib.suppress(StateConflict):
                await self.store.put_signed(
                    REVOCATIONS_KEY, state, last=None if found is None else found[1]
                )

    async def revoke(self, request: RevocationRequest) -> RevocationResult:
        """Revoke one certificate (by serial) or every live certificate of an identity.

        A serial needs no record of its issuance: the CA revokes what it is told, and the
        entry stays for the longest lifetime a certificate of this CA can have.
        """
        kind, value = self._target(request)
        now = datetime.now(UTC)
        async with self._lock:  # no certificate is issued between listing and blocking
            issued = await self.store.issued()
            block: IdentityBlock | None = None
            if kind == "serial":
                known = [r for r in issued if r.serial == value]
                longest = now + timedelta(seconds=self.ca.ttl) + NOT_BEFORE_SKEW
                revocations = [self._revocation(r, now, request.reason) for r in known] or [
                    Revocation(
                        serial=value, not_after=longest, revoked_at=now, reason=request.reason
                    )
                ]
            else:
                block = IdentityBlock(spiffe_id=value, at=now)
                revocations = [
                    self._revocation(r, now, request.reason) for r in issued if r.spiffe_id == value
                ]
                if not revocations:
                    _log.info("revoked %s: no live certificate; re-enrolment blocked", value)

            def change(current: RevocationList) -> RevocationList:
                listed = {r.serial for r in current.revoked}
                blocked = [b for b in current.blocked if block is None or b.spiffe_id != value]
                return RevocationList(
                    revoked=[*current.revoked, *(r for r in revocations if r.serial not in listed)],
                    blocked=[*blocked, *([block] if block is not None else [])],
                )

            await self._change_revocations(change)
        for revocation in revocations:
            _log.warning(
                "revoked certificate %s of %s", revocation.serial, revocation.spiffe_id or "?"
            )
        return RevocationResult(revoked=revocations)

    @staticmethod
    def _revocation(record: IdentityRecord, now: datetime, reason: str) -> Revocation:
        """The revocation of an issued certificate, and of the NATS user key of its JWT."""
        return Revocation(
            serial=record.serial,
            spiffe_id=record.spiffe_id,
            not_after=record.not_after,
            revoked_at=now,
            reason=reason,
            nats_key=record.nats_key,
        )

    def _target(self, request: RevocationRequest) -> tuple[Literal["serial", "identity"], str]:
        """What to revoke: ("serial", hex) or ("identity", SPIFFE ID); never a guess."""
        target = request.target.strip()
        kind = request.kind
        if kind == "auto":
            if target.startswith("spiffe://"):
                kind = "spiffe-id"
            elif target.lower().startswith("0x"):
                kind = "serial"
            elif _HEX.match(target.lower()):
                raise InvalidInput(
                    f"{target!r} could be a certificate serial or an agent name; say which: "
                    f"`agentmesh identity revoke --serial {target}` or `--name {target}` "
                    "(or write the serial as 0x…)"
                )
            else:
                kind = "name"
        if kind == "serial":
            serial = target.lower().removeprefix("0x").lstrip("0") or "0"
            if not _HEX.match(serial):
                raise InvalidInput(f"{target!r} is not a certificate serial (hexadecimal)")
            return "serial", serial
        try:
            if kind == "spiffe-id":
                identity = SpiffeId.parse(target)
            else:
                identity = SpiffeId.agent(self.trust_domain, target)
        except ValueError as exc:
            what = "a SPIFFE ID" if kind == "spiffe-id" else "an agent name"
            raise InvalidInput(f"{target!r} is not {what}: {exc}") from exc
        if identity.trust_domain != self.trust_domain:
            raise InvalidInput(f"{identity} is outside trust domain {self.trust_domain!r}")
        return "identity", identity.uri


def _not_reserved(identity: SpiffeId) -> None:
    """An agent may not be named as a role: its NATS subjects (stats, breaker events) would be
    the clients' or the control plane's (``agentmesh.security.nats_auth``)."""
    if identity.kind == "agent" and identity.name in ROLES:
        raise PolicyDenied(
            f"agent name {identity.name!r} is reserved (it names the mesh's clients or its "
            "control plane): choose another"
        )


def _pin(root: x509.Certificate) -> str:
    return fingerprint(root)[:PIN_HEX]


def _issued_by(leaf: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
