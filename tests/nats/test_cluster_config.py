"""``agentmesh nats-config --tls-dir``: the certificate a NATS cluster's nodes run with (the
example cluster itself runs on it in tests/e2e/test_cluster.py)."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agentmesh.nats_config import ROUTE_USER
from agentmesh.security.pki import load_certs
from tests.control.control_process import cli_env, run_cli
from tests.mesh_ca import mesh_ca


def test_the_node_certificate_serves_clients_and_routes(tmp_path: Path) -> None:
    env = cli_env({**mesh_ca().env(), "AGENTMESH_NATS_NODE_CERT_TTL": "86400"})
    args = ["nats-config", "--data-dir", str(tmp_path / "cp"), "--tls-dir", str(tmp_path / "tls")]
    done = run_cli(*args, "--host", "10.0.0.1", "--host", "nats-a.internal", env=env)
    assert done.returncode == 0, done.stderr
    leaf = load_certs((tmp_path / "tls" / "nats.pem").read_bytes())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["nats-a.internal", ROUTE_USER]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == []  # no mesh identity
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert abs(leaf.not_valid_after_utc.timestamp() - (time.time() + 86400)) < 600
    roots = load_certs((tmp_path / "tls" / "mesh-ca.pem").read_bytes())
    assert roots == list(mesh_ca().ca.roots)
    assert oct((tmp_path / "tls" / "nats.key").stat().st_mode & 0o777) == "0o600"


def test_node_tls_without_addresses_is_refused(tmp_path: Path) -> None:
    args = ["nats-config", "--data-dir", str(tmp_path), "--tls-dir", str(tmp_path / "tls")]
    done = run_cli(*args, env=cli_env(mesh_ca().env()))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--host" in done.stderr
    assert not (tmp_path / "tls").exists()
