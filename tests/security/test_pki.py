"""The CA, certificates, signed trust bundles and join tokens, without any network."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from agentmesh.control.ca import CertificateAuthority
from agentmesh.errors import AuthenticationFailed, ConfigurationError
from agentmesh.security.enrol import parse_token
from agentmesh.security.files import write_private
from agentmesh.security.identity import LeafRefused, SpiffeId, check_leaf
from agentmesh.security.pki import fingerprint, key_pem, load_certs, new_key, pem, verify_bundle

from .forge import TD, forge


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_self_managed_ca_is_created_once_with_private_files(tmp_path: Path) -> None:
    ca = CertificateAuthority.in_directory(tmp_path / "ca", TD, ttl=3600)
    assert mode(tmp_path / "ca") == 0o700
    keys = list((tmp_path / "ca").glob("*.key"))
    assert len(keys) == 1
    assert mode(keys[0]) == 0o600
    assert mode(tmp_path / "ca" / "ca.json") == 0o600
    again = CertificateAuthority.in_directory(tmp_path / "ca", TD, ttl=3600)
    assert again.signer == ca.signer
    assert again.bundle == ca.bundle
    with pytest.raises(ConfigurationError, match="created for trust domain 'agentmesh.local'"):
        CertificateAuthority.in_directory(tmp_path / "ca", "other.example", ttl=3600)


def test_leaves_have_exactly_one_spiffe_id_and_a_short_life(tmp_path: Path) -> None:
    ca = CertificateAuthority.in_directory(tmp_path / "ca", TD, ttl=600)
    key = new_key()
    leaf = ca.issue(key.public_key(), SpiffeId.agent(TD, "summarizer"))
    assert check_leaf(leaf, TD).spiffe_id == "spiffe://agentmesh.local/agent/summarizer"
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is False
    assert leaf.not_valid_after_utc - datetime.now(UTC) <= timedelta(seconds=600)
    leaf.verify_directly_issued_by(ca.signer)


@pytest.mark.parametrize(
    ("flaws", "reason"),
    [
        ({"ca": True}, "is a CA certificate used as a leaf"),
        ({"uris": (f"spiffe://{TD}/agent/a", f"spiffe://{TD}/agent/b")}, "has 2 URI SANs"),
        ({"uris": ()}, "has 0 URI SANs"),
        (
            {"uris": ("spiffe://elsewhere.example/agent/a",)},
            "from trust domain 'elsewhere.example'",
        ),
        ({"uris": (f"spiffe://{TD}/admin",)}, "a mesh identity is"),
        (
            # Relative to when the test runs, not to collection (a long run would turn an
            # absolute time into "not_before after not_after", another flaw).
            {"not_after": timedelta(seconds=-1)},
            "outside its validity period",
        ),
    ],
)
def test_check_leaf_refuses_what_chain_verification_lets_through(
    flaws: dict[str, object], reason: str, tmp_path: Path
) -> None:
    ca = CertificateAuthority.in_directory(tmp_path / "ca", TD, ttl=600)
    if isinstance(offset := flaws.get("not_after"), timedelta):
        flaws = {**flaws, "not_after": datetime.now(UTC) + offset}
    _, cert = forge(ca._key, ca.signer, **flaws)  # type: ignore[arg-type]
    with pytest.raises(LeafRefused, match=reason):
        check_leaf(cert, TD)


def test_rotation_overlaps_roots_and_bundles_chain_to_what_sidecars_already_trust(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.in_directory(tmp_path / "ca", TD, ttl=600)
    old_root = ca.signer
    v1 = ca.bundle
    v2 = ca.rotate()
    assert v2.version == v1.version + 1
    assert [load_certs(r)[0] for r in v2.roots] == [ca.signer, old_root]
    # A sidecar that trusts only the old root takes v2; one that already has v2 takes it too.
    verify_bundle(v2, [old_root])
    verify_bundle(v2, [ca.signer])
    # The old key is gone: only the new root's key remains on disk.
    assert [p.stem for p in (tmp_path / "ca").glob("*.key")] == [fingerprint(ca.signer)[:32]]
    # New leaves come from the new root.
    leaf = ca.issue(new_key().public_key(), SpiffeId.client(TD, "alice"))
    leaf.verify_directly_issued_by(ca.signer)
    # Nothing to retire yet; after the old root's last leaf expired, it leaves the bundle.
    assert ca.retire_due() is None
    ca.retiring[0].retire_after = datetime.now(UTC) - timedelta(seconds=1)
    v3 = ca.retire_due()
    assert v3 is not None
    assert v3.version == v2.version + 1
    assert [load_certs(r)[0] for r in v3.roots] == [ca.signer]
    verify_bundle(v3, [load_certs(r)[0] for r in v2.roots])
    reopened = CertificateAuthority.in_directory(tmp_path / "ca", TD, ttl=600)
    assert reopened.bundle == v3


def test_a_bundle_from_anyone_else_is_refused(tmp_path: Path) -> None:
    ours = CertificateAuthority.in_directory(tmp_path / "ours", TD, ttl=600)
    theirs = CertificateAuthority.in_directory(tmp_path / "theirs", TD, ttl=600)
    injected = theirs.bundle.model_copy(update={"version": 99})
    with pytest.raises(ValueError, match="not signed by a trusted CA"):
        verify_bundle(injected, ours.roots)
    # Our signature does not cover a root added afterwards.
    grown = ours.bundle.model_copy(update={"roots": [*ours.bundle.roots, pem(theirs.signer)]})
    with pytest.raises(ValueError, match="not signed by a trusted CA"):
        verify_bundle(grown, ours.roots)
    unsigned = ours.bundle.model_copy(update={"signatures": []})
    with pytest.raises(ValueError, match="no signature"):
        verify_bundle(unsigned, ours.roots)


def test_an_operator_supplied_intermediate_signs_leaves_and_bundles(tmp_path: Path) -> None:
    root_ca = CertificateAuthority.in_directory(tmp_path / "root", TD, ttl=600)
    key = new_key()
    now = datetime.now(UTC)
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh intermediate")]))
        .issuer_name(root_ca.signer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(root_ca._key, hashes.SHA256())
    )
    (tmp_path / "ca.pem").write_text(pem(intermediate) + pem(root_ca.signer))
    write_private(tmp_path / "ca.key", key_pem(key))
    ca = CertificateAuthority.from_files(tmp_path / "ca.pem", tmp_path / "ca.key", TD, ttl=600)
    assert ca.roots == [root_ca.signer]
    assert ca.chain == []
    assert ca.signer == intermediate
    leaf = ca.issue(new_key().public_key(), SpiffeId.agent(TD, "worker"))
    leaf.verify_directly_issued_by(intermediate)
    verify_bundle(ca.bundle, [root_ca.signer])
    with pytest.raises(ConfigurationError, match="must end with the root"):
        (tmp_path / "only.pem").write_text(pem(intermediate))
        CertificateAuthority.from_files(tmp_path / "only.pem", tmp_path / "ca.key", TD, 600)
    # A key other users can read may have leaked: refused, naming the file.
    (tmp_path / "ca.key").chmod(0o640)
    with pytest.raises(
        ConfigurationError, match=r"ca\.key is accessible to other users \(mode 0640\)"
    ):
        CertificateAuthority.from_files(tmp_path / "ca.pem", tmp_path / "ca.key", TD, ttl=600)


@pytest.mark.parametrize(
    "token", ["", "amt1", "amt1.abc.def", "jwt.eyJ.x", "amt2." + "0" * 32 + ".s"]
)
def test_malformed_join_tokens_are_refused_before_anything_is_sent(token: str) -> None:
    with pytest.raises(AuthenticationFailed, match="not an agentmesh join token"):
        parse_token(token)
