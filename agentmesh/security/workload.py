"""A sidecar's mesh identity: key, certificate, trust bundle, TLS contexts, renewal, revocations.

Where the certificate comes from, in order:

1. ``AGENTMESH_CA_CERT_FILE`` + ``AGENTMESH_CA_KEY_FILE``: this process holds the CA, and issues
   its own certificate (recorded in KV like any other). The control plane does this for itself;
   single-host setups and test suites may too.
2. a join token: ``AGENTMESH_JOIN_TOKEN``, else the control plane's ``join-token`` file in
   ``AGENTMESH_DATA_DIR`` (same machine, same user: zero configuration). The sidecar checks the
   control plane's trust bundle against the token's pin, then sends a CSR with the token.

The private key is made here and never leaves the process. Renewal happens at about half the
certificate's lifetime (±10% jitter, so a fleet started together does not renew together),
authenticated by the current certificate and key; a new TLS context is built and used for every
*new* connection, inbound and outbound, while open connections finish on the old one — no call
fails across a renewal. If renewal fails it is retried with backoff until the certificate
expires (then peers refuse it and calls fail with a clear error).

The trust bundle is watched in KV and replaced only by a newer version signed by a root already
trusted (root rotation); the revocation list is watched too (taken only if the mesh CA signed it,
never rolled back: ``security/store.py``), and listeners (the transport) close connections to
revoked peers at once. :meth:`WorkloadIdentity.state_trust` is what the registry index and the
policy cache check what they read from NATS with.

cryptography and the enrolment client are imported by the methods that get certificates, not
here: with ``AGENTMESH_MTLS=off`` nothing needs them, and importing them is a noticeable share of an
agent's start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agentmesh._tasks import stop_task
from agentmesh.control_planes import live_control
from agentmesh.errors import (
    AuthenticationFailed,
    ConfigurationError,
    MeshError,
    RegistryUnavailable,
)
from agentmesh.models import CertificateRequest, IssuedCertificate, RenewalProof, TrustBundle
from agentmesh.registry.connection import NatsConnection
from agentmesh.security.files import JOIN_TOKEN_FILE, read_secret
from agentmesh.security.identity import Kind, LeafRefused, SpiffeId, check_leaf
from agentmesh.security.store import SecurityStore, SecurityView, security_bucket
from agentmesh.settings import Settings

if TYPE_CHECKING:
    from cryptography import x509

    from agentmesh.security.natsjwt import NKey
    from agentmesh.security.pki import PrivateKey
    from agentmesh.security.signed import StateTrust

__all__ = ["WorkloadIdentity", "default_client_name"]

_log = logging.getLogger("agentmesh.security")

Mode = Literal["strict", "permissive", "off"]
#: Sources of certificates: (csr pem, renewal proof or None) -> issued certificate.
Source = Callable[[str, RenewalProof | None], Awaitable[IssuedCertificate]]


def default_client_name() -> str:
    """The user name, made fit for a SPIFFE path segment."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    name = re.sub(r"[^a-z0-9._-]+", "-", user.lower()).strip("._-")[:64]
    return name or "user"


class WorkloadIdentity:
    """The identity of one sidecar; ``server_context()``/``client_context()`` are always current."""

    def __init__(self, settings: Settings, *, kind: Kind, name: str, owner: str) -> None:
        self.mode: Mode = settings.mtls
        self.owner = owner
        self._settings = settings
        self._kind = kind
        self._name = name
        self.id: SpiffeId | None = None
        self.view = SecurityView()
        self.store: SecurityStore | None = None
        self._trust_domain = settings.trust_domain
        self._key: PrivateKey | None = None
        self._certs: list[x509.Certificate] = []
        self._roots: list[x509.Certificate] = []
        self.bundle_version = 0
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        self.not_after = 0.0
        self._issued_at = 0.0
        self.renewals = 0
        self._issuer: object | None = None
        self._pending_public_key: object | None = None
        self._remote = False
        self._renewal: asyncio.Task[None] | None = None
        self._revoked_seen: frozenset[int] = frozenset()
        self._on_revoked: list[Callable[[frozenset[int]], None]] = []
        self._trust: StateTrust | None = None
        #: The cache file this client's current certificate is kept in (None: not cached).
        self._cached: Path | None = None
        #: NATS: this process's user key, the JWT the CA signed for it, its inbox prefix.
        self._nats_key: NKey | None = None
        self._nats_jwt: str | None = None
        self._inbox = ""
        self._on_roots: list[Callable[[str], None]] = []
        self._on_nats_renewed: list[Callable[[], None]] = []

    @classmethod
    def for_caller(cls, settings: Settings, caller: str) -> WorkloadIdentity:
        """What a sidecar is from its caller name: an agent, a client, or the control plane."""
        if caller == "control":
            return cls(settings, kind="control", name="", owner="control")
        if caller == "client":
            name = settings.client_name or default_client_name()
            return cls(settings, kind="client", name=name, owner="client")
        return cls(settings, kind="agent", name=caller, owner=caller)

    # ---- what others read ------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def revoked(self) -> frozenset[int]:
        return self.view.revoked

    @property
    def serial(self) -> int | None:
        return self._certs[0].serial_number if self._certs else None

    def server_context(self) -> ssl.SSLContext:
        assert self._server is not None, "start() first"
        return self._server

    def client_context(self) -> ssl.SSLContext | None:
        return self._client

    @property
    def nats_user(self) -> tuple[str, NKey, str] | None:
        """(user JWT, its key, inbox prefix) for NATS, once enrolment has handed them out."""
        if self._nats_jwt is None or self._nats_key is None:
            return None
        return self._nats_jwt, self._nats_key, self._inbox

    def roots_pem(self) -> str:
        """The trusted roots (PEM): what the NATS server's certificate must chain to."""
        from agentmesh.security.pki import pem

        return "".join(pem(c) for c in self._roots)

    def on_roots(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(roots PEM)`` whenever the trusted roots may have changed."""
        self._on_roots.append(listener)

    def on_nats_renewed(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` when a renewal brought a new NATS user JWT (reconnect with it)."""
        self._on_nats_renewed.append(listener)

    def state_trust(self) -> StateTrust | None:
        """What this workload takes from NATS (signed state, checked against its current roots);
        None with mTLS off, where there are no roots and state is taken as read."""
        if not self.enabled:
            return None
        if self._trust is None:
            from agentmesh.security.signed import StateTrust

            self._trust = StateTrust(lambda: self._roots, lambda: self._trust_domain)
        return self._trust

    def seal_record(self, record: bytes) -> bytes:
        """``record`` (a registry record's JSON) signed by this workload's key, with its
        certificate: watchers take a record only from the agent it names."""
        from agentmesh.security.signed import seal_record

        assert self._key is not None, "start() first"
        return seal_record(record, self._key, self._certs)

    def on_revoked(self, listener: Callable[[frozenset[int]], None]) -> None:
        """Call ``listener(revoked serials)`` whenever the revocation list changes."""
        self._on_revoked.append(listener)

    def use_issuer(self, issuer: object) -> None:
        """Issue from this ``agentmesh.control.issuer.Issuer`` (the control plane's own CA)."""
        self._issuer = issuer

    # ---- lifecycle -----------------------------------------------------------------------------

    async def prepare(self, registry_bucket: str) -> None:
        """Before NATS: get what connecting to it takes, i.e. enrol (the NATS user JWT comes
        with the certificate), or mint our own JWT where this process holds the NATS keys."""
        if not self.enabled or self._certs:
            return
        if self._issuer is not None or self._settings.ca_cert_file is not None:
            self._own_nats_user(registry_bucket)
            return
        await self._obtain(first=True)

    def _own_nats_user(self, registry_bucket: str) -> None:
        from agentmesh.control.ca import CertificateAuthority
        from agentmesh.security.nats_auth import NatsAuthority, inbox_prefix
        from agentmesh.security.pki import load_certs

        authority = getattr(self._issuer, "nats", None)
        if not isinstance(authority, NatsAuthority):
            authority = NatsAuthority.existing(self._settings.data_dir)
        if authority is None:
            return  # an operator-run NATS: its settings say how to connect
        ca = getattr(self._issuer, "ca", None)
        if isinstance(ca, CertificateAuthority):
            self._trust_domain, roots = ca.trust_domain, list(ca.roots)
        else:
            assert self._settings.ca_cert_file is not None
            try:
                certs = load_certs(self._settings.ca_cert_file.read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigurationError(
                    f"cannot load {self._settings.ca_cert_file}: {exc}"
                ) from exc
            roots = [c for c in certs if c.issuer == c.subject]
        # Holding the mesh's keys is the control plane's power anyway, and a process that
        # issues certificates records them in the security bucket: NATS lets it do anything.
        control = SpiffeId(self._trust_domain, "control")
        self._nats_jwt, self._nats_key = authority.own_user(control, bucket=registry_bucket)
        self._inbox = inbox_prefix(control)
        self._roots = roots

    async def start(self, conn: NatsConnection, registry_bucket: str) -> None:
        """Get a certificate and the revocation list; then keep both current."""
        if not self.enabled:
            return
        shared = getattr(self._issuer, "store", None)  # the control plane's own issuer
        self.store = (
            shared
            if isinstance(shared, SecurityStore)
            else SecurityStore(conn, security_bucket(registry_bucket))
        )
        await self.store.open()
        if not self._certs:  # else enrolled before NATS (prepare)
            await self._obtain(first=True)  # the roots come with the certificate
        trust = self.state_trust()
        assert trust is not None
        self.view.on_change(self._view_changed)
        self.view.start(self.store, conn, trust)
        try:
            async with asyncio.timeout(conn.jetstream_wait):
                await self.view.synced.wait()
        except TimeoutError as exc:
            raise RegistryUnavailable(
                f"the revocation list did not arrive within {conn.jetstream_wait:g}s from NATS "
                f"at {conn.url}"
            ) from exc
        if self._cached is not None and not self._cache_fits_mesh():
            from agentmesh.security import client_cache

            client_cache.discard(self._cached)
            self._cached = None
            self._roots, self.bundle_version = [], 0  # the new CA's bundle starts anew
            await self._obtain(first=True, reuse=False)
            self.view.recheck()  # signed by the new CA: it verifies against the new roots
        self._renewal = asyncio.create_task(self._renew_loop(), name="identity-renewal")

    async def close(self) -> None:
        renewal, self._renewal = self._renewal, None
        await stop_task(renewal, f"certificate renewal of {self.owner}")
        await self.view.stop()

    # ---- getting certificates -----------------------------------------------------------------

    def _local_issuer(self) -> object | None:
        if self._issuer is not None:
            return self._issuer
        settings = self._settings
        if settings.ca_cert_file is None or settings.ca_key_file is None:
            return None
        from agentmesh.control.ca import CertificateAuthority
        from agentmesh.control.issuer import Issuer

        assert self.store is not None
        ca = CertificateAuthority.from_files(
            settings.ca_cert_file, settings.ca_key_file, settings.trust_domain, settings.cert_ttl
        )
        self._issuer = Issuer(ca, self.store)
        return self._issuer

    def _token(self) -> str | None:
        given = self._settings.join_token
        if given is not None and given.get_secret_value():
            return given.get_secret_value()
        return read_secret(self._settings.data_dir / JOIN_TOKEN_FILE)

    def _no_source(self) -> ConfigurationError:
        return ConfigurationError(
            f"{self.owner}: mTLS is {self.mode}, but there is no way to get a mesh certificate: "
            f"run it where the control plane's data dir is (AGENTMESH_DATA_DIR; "
            f"{self._settings.data_dir} has no {JOIN_TOKEN_FILE}), give it a join token "
            "(AGENTMESH_JOIN_TOKEN, from `agentmesh token create`), or opt out of mTLS "
            "with AGENTMESH_MTLS=off"
        )

    async def _source(self, *, renew: bool) -> tuple[Source, list[x509.Certificate] | None]:
        """How to get a certificate now, and the roots a first bundle must be signed by."""
        from agentmesh.security.enrol import RemoteIssuer
        from agentmesh.security.pki import load_certs

        issuer = self._local_issuer()
        if issuer is not None:
            from agentmesh.control.issuer import Issuer

            assert isinstance(issuer, Issuer)
            self._trust_domain = issuer.trust_domain
            self._remote = False

            async def local(csr: str, proof: RenewalProof | None) -> IssuedCertificate:
                if self._kind == "control":
                    return await issuer.issue_control(self._pending_public_key)
                return await issuer.issue_local(csr)

            return local, None
        token = None if renew else self._token()
        if not renew and token is None:
            raise self._no_source()
        live = await live_control(self._settings.control_url)
        remote = RemoteIssuer(live, token, verify=await self._verify(renew, live))
        self._remote = True
        pinned: list[x509.Certificate] | None = None
        if not renew:
            bundle = await remote.trust_bundle()
            self._trust_domain = bundle.trust_domain
            pinned = [c for text in bundle.roots for c in load_certs(text)]

        if self._nats_key is None:
            from agentmesh.security.natsjwt import USER, NKey

            self._nats_key = NKey.generate(USER)
        nats_key = self._nats_key.public

        async def request(csr: str, proof: RenewalProof | None) -> IssuedCertificate:
            return await remote.issue(CertificateRequest(csr=csr, renewal=proof, nats_key=nats_key))

        return request, pinned

    async def _verify(self, renew: bool, control_url: str) -> ssl.SSLContext | bool:
        """What the control plane at ``control_url`` must prove with its certificate: on renewal
        the roots of the trust bundle this sidecar holds (kept current through rotations); at
        enrolment what ``control_trust`` finds (the operator's file, the data dir, the pin)."""
        from agentmesh.security.control_trust import control_verify, roots_context
        from agentmesh.security.pki import pem

        if renew and self._roots and control_url.startswith("https:"):
            return roots_context("".join(pem(r) for r in self._roots))
        return await control_verify(self._settings.model_copy(update={"control_url": control_url}))

    def _cache_file(self) -> Path | None:
        """Where this client keeps its certificate between runs (agents always enrol afresh)."""
        if self._kind != "client":
            return None
        from agentmesh.security import client_cache

        return client_cache.cache_path(self._settings, self._name)

    def _reuse_cached(self) -> bool:
        """Take the cached certificate of an earlier run of this client, if it is still good."""
        from agentmesh.security import client_cache

        path = self._cache_file()
        cached = client_cache.load(path, self._name) if path is not None else None
        if path is None or cached is None:
            return False
        self._trust_domain = cached.bundle.trust_domain
        self._adopt_bundle(cached.bundle, [])  # verified against the pin when it was issued
        self.id = SpiffeId(self._trust_domain, self._kind, self._name)
        self._key, self._certs = cached.key, cached.certs
        self._issued_at = cached.issued_at
        self.not_after = cached.certs[0].not_valid_after_utc.timestamp()
        if cached.issued.nats_jwt is not None and cached.nats_seed is not None:
            from agentmesh.security.nats_auth import inbox_prefix
            from agentmesh.security.natsjwt import NKey

            self._nats_key = NKey.from_seed(cached.nats_seed)
            self._nats_jwt, self._inbox = cached.issued.nats_jwt, inbox_prefix(self.id)
        self._rebuild()
        self._cached = path
        _log.info("%s: reusing certificate %x from %s", self.owner, self.serial, path)
        return True

    def _cache_fits_mesh(self) -> bool:
        """Whether the reused certificate is neither revoked nor from a CA this mesh dropped.

        The KV view decides only against reuse (then the client enrols as if nothing were
        cached), never for trust: the roots stay those the certificate was issued with.
        """
        from agentmesh.security.pki import fingerprint, load_certs

        if self.serial in self.view.revoked:
            return False
        issuer = self._local_issuer()  # this process holds the CA: its roots are the truth
        if issuer is not None:
            from agentmesh.control.issuer import Issuer

            assert isinstance(issuer, Issuer)
            domain, roots = issuer.trust_domain, list(issuer.ca.roots)
        elif self.view.bundle is not None:
            bundle = self.view.bundle
            domain, roots = bundle.trust_domain, [c for t in bundle.roots for c in load_certs(t)]
        else:
            return True
        current = {fingerprint(c) for c in roots}
        return domain == self._trust_domain and bool(
            current & {fingerprint(c) for c in self._roots}
        )

    async def _obtain(self, *, first: bool, reuse: bool = True) -> None:
        from cryptography.hazmat.primitives import serialization

        from agentmesh.security.enrol import renewal_proof
        from agentmesh.security.pki import load_certs, new_csr, new_key, same_public_key

        if first and reuse and self._reuse_cached():
            return
        source, pinned = await self._source(renew=not first)
        key = new_key()
        try:
            identity = SpiffeId(self._trust_domain, self._kind, self._name)
        except ValueError as exc:
            raise ConfigurationError(f"{self.owner}: no valid mesh identity: {exc}") from exc
        csr = new_csr(key, identity.uri)
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
        proof = None
        if not first and self._remote and self._key is not None:
            proof = renewal_proof(self._key, self._certs, csr)
        self._pending_public_key = key.public_key()
        issued = await source(csr_pem, proof)
        leaf, *chain = load_certs(issued.certificate) + [
            c for text in issued.chain for c in load_certs(text)
        ]
        if not same_public_key(leaf.public_key(), key.public_key()):
            raise AuthenticationFailed(
                f"{self.owner}: the CA returned a certificate for another key"
            )
        try:
            got = check_leaf(leaf, self._trust_domain).id
        except LeafRefused as exc:
            raise AuthenticationFailed(f"{self.owner}: the CA returned {exc}") from None
        if got != identity:
            raise AuthenticationFailed(f"{self.owner}: asked for {identity}, the CA issued {got}")
        self._adopt_bundle(issued.trust_bundle, pinned if pinned is not None else self._roots)
        renewed_nats = issued.nats_jwt is not None and self._nats_jwt is not None
        if issued.nats_jwt is not None:
            from agentmesh.security.nats_auth import inbox_prefix

            self._nats_jwt, self._inbox = issued.nats_jwt, inbox_prefix(identity)
        self.id = identity
        self._key, self._certs = key, [leaf, *chain]
        self._issued_at = time.time()
        self.not_after = leaf.not_valid_after_utc.timestamp()
        self._rebuild()
        cache = self._cache_file()
        if cache is not None:
            from agentmesh.security import client_cache

            try:
                seed = self._nats_key.seed if self._nats_key is not None else None
                client_cache.save(cache, key, issued, self._issued_at, seed)
            except OSError as exc:  # a read-only data dir costs an enrolment per run, no more
                _log.warning("%s: cannot keep the certificate in %s: %s", self.owner, cache, exc)
        if renewed_nats:
            for listener in list(self._on_nats_renewed):
                listener()
        _log.info(
            "%s: certificate %x for %s, valid until %s",
            self.owner,
            leaf.serial_number,
            identity,
            leaf.not_valid_after_utc.isoformat(timespec="seconds"),
        )

    def _adopt_bundle(self, bundle: TrustBundle, trusted: list[x509.Certificate]) -> bool:
        from agentmesh.security.pki import load_certs, verify_bundle

        if bundle.trust_domain != self._trust_domain or bundle.version <= self.bundle_version:
            return False
        if trusted:
            verify_bundle(bundle, trusted)
        self._roots = [c for text in bundle.roots for c in load_certs(text)]
        self.bundle_version = bundle.version
        return True

    def _rebuild(self) -> None:
        from agentmesh.security.pki import client_context, server_context

        assert self._key is not None
        self._server = server_context(self._key, self._certs, self._roots)
        self._client = client_context(self._key, self._certs, self._roots)
        for trust in list(self._on_roots):
            trust(self.roots_pem())

    async def _renew_loop(self) -> None:
        while True:
            lifetime = max(self.not_after - self._issued_at, 0.1)
            at = self._issued_at + lifetime * random.uniform(0.45, 0.55)
            await asyncio.sleep(max(at - time.time(), 0.0))
            failures = 0
            while True:
                try:
                    await self._obtain(first=False)
                except AuthenticationFailed as exc:
                    if self._remote and self._token() is not None:
                        _log.warning("%s: renewal refused (%s); enrolling again", self.owner, exc)
                        with contextlib.suppress(MeshError, OSError, ValueError):
                            await self._obtain(first=True, reuse=False)
                            self.renewals += 1
                            break
                    failures += 1
                    self._renewal_failed(exc, failures)
                except (MeshError, OSError, ValueError) as exc:
                    failures += 1
                    self._renewal_failed(exc, failures)
                else:
                    self.renewals += 1
                    break
                remaining = self.not_after - time.time()
                await asyncio.sleep(min(max(remaining / 10, 0.2), 30.0))

    def _renewal_failed(self, exc: Exception, failures: int) -> None:
        remaining = self.not_after - time.time()
        if remaining > 0:
            _log.warning(
                "%s: certificate renewal failed (%s); retrying, %.0fs left",
                self.owner,
                exc,
                remaining,
            )
        else:
            _log.error(
                "%s: certificate expired and renewal keeps failing (%d attempts): %s; peers "
                "refuse this workload until it renews",
                self.owner,
                failures,
                exc,
            )

    # ---- the watched view -------------------------------------------------------------------

    def _view_changed(self) -> None:
        bundle = self.view.bundle
        if bundle is not None and bundle.version > self.bundle_version and self._roots:
            try:
                if self._adopt_bundle(bundle, self._roots):
                    self._rebuild()
                    _log.info(
                        "%s: trust bundle v%d (%d roots)",
                        self.owner,
                        bundle.version,
                        len(bundle.roots),
                    )
            except ValueError as exc:
                _log.warning(
                    "%s: ignoring trust bundle v%d from KV: %s", self.owner, bundle.version, exc
                )
        revoked = self.view.revoked
        if revoked != self._revoked_seen:
            self._revoked_seen = revoked
            if self.serial is not None and self.serial in revoked:
                _log.error("%s: this workload's own certificate was revoked", self.owner)
            for listener in list(self._on_revoked):
                try:
                    listener(revoked)
                except Exception:
                    _log.exception("revocation listener failed")
