"""NATS NKEYs and JWTs, signed with ``cryptography``'s Ed25519.

NATS's decentralised authentication (operator → account → user, each an Ed25519 key in NATS's
"NKEY" text form) is how the mesh gives every workload its own NATS permissions without
touching the server's configuration per agent: the control plane holds the account key, and
signs a user JWT for each enrolled workload, bound to a key only that workload holds. This
module is the wire format only, as nats-io/nkeys and nats-io/jwt (v2) define it; the ``nkeys``
package would pull in PyNaCl for the same 60 lines.

An NKEY is base32 (no padding) of ``prefix byte(s) | 32 key bytes | CRC-16/XMODEM`` (little
endian). A JWT is ``base64url(header).base64url(claims).base64url(ed25519 signature)``, the
signature over the first two parts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "ACCOUNT",
    "OPERATOR",
    "USER",
    "NKey",
    "decode_jwt_claims",
    "encode_jwt",
    "format_creds",
    "parse_creds",
]

OPERATOR = 14 << 3
"""Prefix byte of operator keys ("O...")."""
ACCOUNT = 0
"""Prefix byte of account keys ("A...")."""
USER = 20 << 3
"""Prefix byte of user keys ("U...")."""
_SEED = 18 << 3
_KINDS = {OPERATOR: "operator", ACCOUNT: "account", USER: "user"}


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


def _unb32(text: str) -> bytes:
    return base64.b32decode(text + "=" * (-len(text) % 8))


def _with_crc(data: bytes) -> str:
    return _b32(data + _crc16(data).to_bytes(2, "little"))


@dataclass(frozen=True, slots=True)
class NKey:
    """An Ed25519 key pair of one NATS role (operator, account or user)."""

    prefix: int
    key: Ed25519PrivateKey

    @classmethod
    def generate(cls, prefix: int) -> NKey:
        return cls(prefix, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: str) -> NKey:
        """Parse ``S<role>...`` text; ValueError saying what is wrong with it."""
        try:
            raw = _unb32(seed.strip())
        except ValueError as exc:
            raise ValueError("not an NKEY seed (bad base32)") from exc
        if len(raw) != 36 or _crc16(raw[:-2]) != int.from_bytes(raw[-2:], "little"):
            raise ValueError("not an NKEY seed (bad length or checksum)")
        if raw[0] & 0xF8 != _SEED:
            raise ValueError("not an NKEY seed (it is a public key?)")
        prefix = ((raw[0] & 0x07) << 5) | ((raw[1] & 0xF8) >> 3)
        if prefix not in _KINDS:
            raise ValueError("an NKEY seed of a role agentmesh does not use")
        return cls(prefix, Ed25519PrivateKey.from_private_bytes(raw[2:34]))

    @property
    def kind(self) -> str:
        return _KINDS[self.prefix]

    @property
    def public(self) -> str:
        raw = self.key.public_key().public_bytes_raw()
        return _with_crc(bytes([self.prefix]) + raw)

    @property
    def seed(self) -> str:
        raw = self.key.private_bytes_raw()
        head = bytes([_SEED | (self.prefix >> 5), (self.prefix & 31) << 3])
        return _with_crc(head + raw)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def encode_jwt(
    issuer: NKey,
    subject: str,
    nats: dict[str, Any],
    *,
    name: str = "",
    expires: float | None = None,
    issued_at: int | None = None,
) -> str:
    """A v2 NATS JWT about ``subject`` (a public NKEY) signed by ``issuer``.

    ``nats`` is the role's claims (``version`` is added). ``jti`` is a hash of the other
    claims that names the token (servers do not check how it was computed). ``issued_at``
    (default: now) fixed makes the same claims the same JWT (Ed25519 signs deterministically).
    """
    claims: dict[str, Any] = {
        "iat": int(time.time()) if issued_at is None else issued_at,
        "iss": issuer.public,
        "sub": subject,
    }
    if name:
        claims["name"] = name
    if expires is not None:
        claims["exp"] = int(expires)
    claims["jti"] = _b32(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest())
    claims["nats"] = {**nats, "version": 2}
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signed = f"{header}.{body}"
    return f"{signed}.{_b64url(issuer.sign(signed.encode('ascii')))}"


def decode_jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, *unverified* (the NATS server verifies; we only read ``exp``)."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (IndexError, ValueError) as exc:
        raise ValueError("not a JWT") from exc
    if not isinstance(claims, dict):
        raise ValueError("not a JWT")
    return claims


_JWT_BEGIN = "-----BEGIN NATS USER JWT-----"
_SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"


def format_creds(user_jwt: str, user: NKey) -> str:
    """A ``.creds`` file as ``nsc`` writes it (the NATS CLI and every client read it)."""
    return (
        f"{_JWT_BEGIN}\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"{_SEED_BEGIN}\n{user.seed}\n------END USER NKEY SEED------\n"
    )


def parse_creds(text: str) -> tuple[str, NKey]:
    """(user JWT, user key) of a ``.creds`` file; ValueError naming what is missing."""
    lines = [line.strip() for line in text.splitlines()]

    def after(marker: str) -> str:
        try:
            value = lines[lines.index(marker) + 1]
        except (ValueError, IndexError):
            raise ValueError(f"no {marker!r} section") from None
        if not value:
            raise ValueError(f"empty {marker!r} section")
        return value

    user = NKey.from_seed(after(_SEED_BEGIN))
    if user.prefix != USER:
        raise ValueError("the seed is not a user NKEY")
    return after(_JWT_BEGIN), user
