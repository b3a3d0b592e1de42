"""Who may do what on NATS: the mesh's NATS account, and a user JWT per enrolled workload.

NATS authenticates and authorizes with its own decentralised JWT accounts: the control plane
keeps an operator key, an account key and a system-account key in ``<data dir>/nats-auth/``
(0600); the server is told to trust that operator and account (:meth:`NatsAuthority.
resolver_config`), nothing per agent. At enrolment (and every renewal) a workload sends the
public half of an NKEY it made itself, and the control plane signs a *user JWT* for it, with the
permissions of its SPIFFE identity and the certificate's expiry (:func:`user_permissions`). The
server checks the JWT's signature and the workload's signature over a per-connection nonce, so
only that process can use it, and enforces the permissions per subject. A new agent name needs
no server change; the control plane can be down while agents reconnect.

Subjects (``B`` is the registry bucket; its policies and security buckets are ``B_policies``
and ``B_security``):

===============================  ==========================================================
``$KV.B.<agent>.<instance>``     an agent's own registry records (the key layout makes
                                 "only your own records" a publish permission)
``$JS.API.…`` of the 3 streams   read: stream info, message get, ordered consumers (watch);
                                 and create-if-missing (an existing bucket is never changed)
``agentmesh.stats.B.<who>``      stats reports; ``<who>`` is the agent name or ``client``
``agentmesh.breaker.B.<who>``    breaker events, same
``agentmesh.tap*.B…``            ``agentmesh tap``: clients ask, agents answer (one reply)
``_INBOX.<kind>.<name>.>``       replies to this workload only (its nats-py inbox prefix)
===============================  ==========================================================

Only the control plane's user has no restriction: it alone writes policies, the security bucket
(trust bundle, revocations) and other agents' records, and it alone reads or writes the
``B_ca`` bucket (issued certificates, join-token state: ``agentmesh.security.store`` says why
that is a bucket of its own rather than a key prefix).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentmesh.errors import ConfigurationError
from agentmesh.security.files import read_secret, write_private
from agentmesh.security.identity import SpiffeId
from agentmesh.security.natsjwt import ACCOUNT, OPERATOR, USER, NKey, decode_jwt_claims, encode_jwt

__all__ = [
    "AUTH_DIR",
    "NatsAuthority",
    "inbox_prefix",
    "revocations_version",
    "user_permissions",
]

AUTH_DIR = "nats-auth"
"""Directory of the NATS keys in the control plane's data dir (0700, files 0600)."""

_NO_LIMIT = -1
#: NATS limits stay off: the buckets bound their own sizes (values, history, TTLs).
_USER_LIMITS = {"subs": _NO_LIMIT, "data": _NO_LIMIT, "payload": _NO_LIMIT}
_ACCOUNT_LIMITS = {
    **_USER_LIMITS,
    "imports": _NO_LIMIT,
    "exports": _NO_LIMIT,
    "wildcards": True,
    "conn": _NO_LIMIT,
    "leaf": _NO_LIMIT,
}
#: The operator JWT's ``iat``, fixed: it then stays the same JWT when the configuration is
#: written again (with new revocations), and nats-server refuses a reload that changes its
#: trusted operators.
_OPERATOR_ISSUED_AT = 0
#: The mesh account's JWT names the version of the signed revocation list it was made from (a
#: tag: NATS keeps it and answers it back), so that a control plane sees whether a server holds
#: a newer list than the one it is about to push (``agentmesh.control.nats_revocations``).
_REVOCATIONS_TAG = "agentmesh-revocations-v"
#: Versions of signed state are microseconds since the epoch (``security/signed.py``).
_VERSION_PER_SECOND = 1_000_000
#: Non-zero storage turns JetStream on for the mesh's account.
_JETSTREAM = {
    "mem_storage": _NO_LIMIT,
    "disk_storage": _NO_LIMIT,
    "streams": _NO_LIMIT,
    "consumer": _NO_LIMIT,
}


def _buckets(bucket: str) -> tuple[str, str, str]:
    # Imported here: both stores import the NATS client; this module is imported by the CLI.
    from agentmesh.policy.store import policy_bucket
    from agentmesh.security.store import security_bucket

    return bucket, policy_bucket(bucket), security_bucket(bucket)


def _token(name: str) -> str:
    """A name as one subject token ('.' separates tokens; client names may contain it)."""
    return name.replace(".", "~")


def inbox_prefix(identity: SpiffeId) -> str:
    """This workload's reply subjects: nobody else may subscribe to them."""
    if identity.kind == "control":
        return "_INBOX"
    return f"_INBOX.{identity.kind}.{_token(identity.name)}"


def _read_streams(bucket: str) -> list[str]:
    """Reading (and creating if missing) the mesh's three KV buckets through JetStream."""
    subjects = ["$JS.API.INFO"]
    for name in _buckets(bucket):
        stream = f"KV_{name}"
        subjects += [
            f"$JS.API.STREAM.INFO.{stream}",
            # Create-if-missing: the stores open their bucket so; on an existing stream with
            # the same configuration it changes nothing, with another it fails.
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.>",
            f"$JS.API.CONSUMER.DELETE.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    return subjects


def user_permissions(identity: SpiffeId, bucket: str) -> dict[str, Any]:
    """The ``pub``/``sub``/``resp`` claims of ``identity``'s user JWT; ``{}`` is everything."""
    if identity.kind == "control":
        return {}
    from agentmesh.sidecar.sidecar import breaker_subject
    from agentmesh.telemetry.stats import stats_subject

    who = identity.name if identity.kind == "agent" else identity.kind  # = the sidecar's caller
    inbox = inbox_prefix(identity)
    publish = [*_read_streams(bucket), stats_subject(bucket, who), breaker_subject(bucket, who)]
    # Every sidecar listens for tap announcements (a client's never matches what it serves).
    subscribe = [f"{inbox}.>", f"agentmesh.tapctl.{bucket}"]
    claims: dict[str, Any] = {}
    if identity.kind == "agent":
        publish += [f"$KV.{bucket}.{identity.name}.>", f"agentmesh.tap.{bucket}.>"]
        claims["resp"] = {"max": 1, "ttl": 0}  # one answer to each tap announcement
    else:
        publish.append(f"agentmesh.tapctl.{bucket}")
        subscribe.append(f"agentmesh.tap.{bucket}.>")
    return {**claims, "pub": {"allow": publish}, "sub": {"allow": subscribe}}


def _key(directory: Path, name: str, prefix: int) -> NKey:
    path = directory / f"{name}.nk"
    seed = read_secret(path)
    if seed is not None:
        key = NKey.from_seed(seed)
        if key.prefix != prefix:
            raise ValueError(f"{path} holds an NKEY of another role")
        return key
    key = NKey.generate(prefix)
    write_private(path, key.seed.encode() + b"\n")
    return key


@dataclass(frozen=True, slots=True)
class NatsAuthority:
    """The operator, mesh account and system account keys; signs the JWTs NATS checks."""

    operator: NKey
    account: NKey
    system: NKey

    @classmethod
    def open(cls, data_dir: Path) -> NatsAuthority:
        """The keys in ``<data_dir>/nats-auth/``, created on first use (0600)."""
        directory = data_dir / AUTH_DIR
        try:
            return cls(
                operator=_key(directory, "operator", OPERATOR),
                account=_key(directory, "account", ACCOUNT),
                system=_key(directory, "system", ACCOUNT),
            )
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"NATS keys in {directory}: {exc}") from exc

    @classmethod
    def existing(cls, data_dir: Path) -> NatsAuthority | None:
        """The keys if the data dir has them (a process holding the CA files next to them)."""
        if not (data_dir / AUTH_DIR / "account.nk").is_file():
            return None
        return cls.open(data_dir)

    def resolver_config(self, account_jwt: str | None = None) -> str:
        """The nats-server configuration that trusts this mesh's operator and accounts.

        For an operator-run NATS, ``include`` it (``agentmesh nats-config``); JetStream is
        enabled for the mesh account without limits (the buckets set their own).
        ``account_jwt``: the mesh account's JWT to preload (one with revocations,
        :meth:`account_jwt`), else one without.
        """
        operator = encode_jwt(
            self.operator,
            self.operator.public,
            {"type": "operator", "system_account": self.system.public},
            name="agentmesh",
            issued_at=_OPERATOR_ISSUED_AT,
        )
        mesh = account_jwt or self.account_jwt()
        system = encode_jwt(
            self.operator,
            self.system.public,
            {"type": "account", "limits": _ACCOUNT_LIMITS},
            name="SYS",
        )
        return (
            "# agentmesh: trust the mesh's NATS operator; one account for the mesh.\n"
            "# Written by agentmesh from the keys in <data dir>/nats-auth/; do not edit.\n"
            f'operator: "{operator}"\n'
            f'system_account: "{self.system.public}"\n'
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f'  {self.account.public}: "{mesh}"\n'
            f'  {self.system.public}: "{system}"\n'
            "}\n"
        )

    def account_jwt(self, revoked: Mapping[str, int] | None = None, version: int = 0) -> str:
        """The mesh account's JWT; ``revoked``: user public NKEY → a time (Unix seconds): the
        server refuses that key's JWTs issued at or before it, and closes their connections.

        ``version``: the signed revocation list's, named in a tag and as ``iat``: every control
        plane makes the same JWT of the same list (a server that has it takes it as no change).
        """
        claims: dict[str, Any] = {
            "type": "account",
            "limits": {**_ACCOUNT_LIMITS, **_JETSTREAM},
            "tags": [f"{_REVOCATIONS_TAG}{version}"],
        }
        if revoked:
            claims["revocations"] = dict(sorted(revoked.items()))
        return encode_jwt(
            self.operator,
            self.account.public,
            claims,
            name="agentmesh",
            issued_at=version // _VERSION_PER_SECOND,
        )

    def user_jwt(
        self, identity: SpiffeId, user_key: str, *, bucket: str, expires: float | None
    ) -> str:
        """A user JWT for ``identity`` bound to ``user_key`` (a public user NKEY).

        ``expires`` should be the certificate's: the server closes the connection then, and the
        client reconnects with the JWT that came with its renewed certificate.
        """
        if not (len(user_key) == 56 and user_key.startswith("U")):
            raise ValueError("nats_key must be a public user NKEY (U..., 56 characters)")
        return encode_jwt(
            self.account,
            user_key,
            {"type": "user", **_USER_LIMITS, **user_permissions(identity, bucket)},
            name=identity.uri,
            expires=expires,
        )

    def system_user(self) -> tuple[str, NKey]:
        """A JWT and key in the system account, for this very process: the servers answer
        ``$SYS.REQ.SERVER.PING.*`` (the JetStream meta leader, for example) and take account
        claims updates (``agentmesh.control.nats_revocations``) only there."""
        user = NKey.generate(USER)
        claims = {"type": "user", **_USER_LIMITS}
        return encode_jwt(self.system, user.public, claims, name="agentmesh-system"), user

    def own_user(self, identity: SpiffeId, *, bucket: str) -> tuple[str, NKey]:
        """A JWT and key for this very process (it holds the account key: no enrolment)."""
        user = NKey.generate(USER)
        return self.user_jwt(identity, user.public, bucket=bucket, expires=None), user


def revocations_version(account_jwt: str) -> int:
    """The revocation list version an account JWT of :meth:`NatsAuthority.account_jwt` was made
    from; 0 for one without (an older agentmesh's, or a configuration written by hand)."""
    tags = decode_jwt_claims(account_jwt).get("nats", {}).get("tags") or []
    versions = [
        t.removeprefix(_REVOCATIONS_TAG)
        for t in tags
        if isinstance(t, str) and t.startswith(_REVOCATIONS_TAG)
    ]
    return max((int(v) for v in versions if v.isdigit()), default=0)
