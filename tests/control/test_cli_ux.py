"""The CLI a newcomer meets, as real processes against a real control plane and NATS.

Errors that name the failing fields, ``call -o yaml``, one client certificate reused across
commands (not one enrolment per command), ``check`` and ``identity list`` counting alike,
``agents``/``find`` reading the NATS they are given, the control plane's "run agents" hint.
"""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from agentmesh import capability
from agentmesh._version import __version__
from agentmesh.cli import app
from agentmesh.control.ca import CertificateAuthority, write_root_ca
from agentmesh.models import IssuedCertificate
from agentmesh.security import client_cache
from agentmesh.security.identity import SpiffeId
from agentmesh.security.pki import PrivateKey, new_key, pem
from agentmesh.security.workload import default_client_name
from tests.control.control_process import CLI_TIMEOUT, arun_cli, cli_env, control_process
from tests.mesh_ca import TRUST_DOMAIN, mesh_ca


@capability
async def echo(text: str, times: int = 1) -> str:
    return " ".join([text] * times)


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"agentmesh {__version__}\n"


CACHE_PATH = (
    "from agentmesh.security.client_cache import cache_path;"
    "from agentmesh.security.workload import default_client_name;"
    "from agentmesh.settings import Settings;"
    "print(cache_path(Settings(), default_client_name()))"
)


def _from_another_ca(tmp_path: Path) -> tuple[PrivateKey, IssuedCertificate, float]:
    other = CertificateAuthority.from_files(
        *write_root_ca(tmp_path / "old-ca", TRUST_DOMAIN), TRUST_DOMAIN, ttl=3600
    )
    key = new_key()
    identity = SpiffeId.client(TRUST_DOMAIN, default_client_name())
    cert = other.issue(key.public_key(), identity)
    issued = IssuedCertificate(
        spiffe_id=identity.uri,
        serial=f"{cert.serial_number:x}",
        certificate=pem(cert),
        not_after=cert.not_valid_after_utc,
        trust_bundle=other.bundle,
    )
    return key, issued, time.time()


async def test_the_cli_reuses_one_certificate_and_says_what_to_fix(
    start_agent, nats_url: str, bucket: str, tmp_path: Path
) -> None:
    await start_agent([echo], name="echoer")
    # The control plane issues from the test CA, so that the agent accepts the CLI's certificate.
    with control_process(nats_url, bucket, tmp_path, env=mesh_ca().env()) as control_url:
        log = (tmp_path / "control.log").read_text()
        assert f"AGENTMESH_DATA_DIR={tmp_path} agentmesh run my_agent.py" in log, log
        # As on one machine: the control URL, and the data dir holding its tokens.
        env = cli_env({"AGENTMESH_CONTROL_URL": control_url, "AGENTMESH_DATA_DIR": str(tmp_path)})

        async def client_certificates() -> list[str]:
            listed = await arun_cli("identity", "list", "-o", "json", env=env)
            assert listed.returncode == 0, listed.stderr
            records = json.loads(listed.stdout)
            return [r["serial"] for r in records if "/client/" in r["spiffe_id"]]

        before = await client_certificates()  # the test's own in-process client has one
        # What an earlier run left under another CA (the control plane was set up anew):
        # dropped once the trust bundle shows it, and the CLI enrols as if nothing were cached.
        where = await asyncio.to_thread(  # the path as the CLI computes it, from its environment
            subprocess.run,
            [sys.executable, "-c", CACHE_PATH],
            env=env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=True,
        )
        stale = Path(where.stdout.strip())
        client_cache.save(stale, *_from_another_ca(tmp_path))
        for _ in range(3):
            done = await arun_cli("call", "echo", '{"text": "hi", "times": 2}', env=env)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout) == "hi hi"
        enrolled = await client_certificates()
        assert len(enrolled) == len(before) + 1, (before, enrolled)
        caches = list((tmp_path / "client-certs").iterdir())  # the CLI's and the test's own
        assert len(caches) == 2, caches
        assert client_cache.load(stale, default_client_name()) is not None, "replaced"
        assert all(stat.S_IMODE(c.stat().st_mode) == 0o600 for c in caches)
        assert stat.S_IMODE(caches[0].parent.stat().st_mode) == 0o700

        as_yaml, wrong, table, check = await asyncio.gather(
            arun_cli("call", "echo", '{"text": "hi"}', "-o", "yaml", env=env),
            arun_cli("call", "echo", '{"txt": "hi"}', env=env),
            arun_cli("identity", "list", env=env),
            arun_cli("check", "-o", "json", env=env),
        )
        assert as_yaml.returncode == 0, as_yaml.stderr
        assert yaml.safe_load(as_yaml.stdout) == "hi"
        assert wrong.returncode == 1
        [line] = wrong.stderr.strip().splitlines()
        assert "text: Field required; txt: Extra inputs are not permitted" in line, line

        assert await client_certificates() == enrolled
        listed = await arun_cli("identity", "list", "-o", "json", env=env)
        records = json.loads(listed.stdout)
        count = f"{len(records)} certificate(s) of {len({r['spiffe_id'] for r in records})} "
        assert count in table.stdout, table.stdout
        [identities] = [c for c in json.loads(check.stdout) if c["check"] == "identities"]
        assert identities["detail"].startswith(count), identities


async def test_agents_and_find_read_the_nats_they_are_given(
    start_agent, nats_url: str, bucket: str, tmp_path: Path
) -> None:
    await start_agent([echo], name="echoer")
    # A control plane of another mesh (another bucket) is what AGENTMESH_CONTROL_URL names.
    with control_process(nats_url, f"{bucket}_other", tmp_path) as control_url:
        env = cli_env(
            {
                "AGENTMESH_CONTROL_URL": control_url,
                "AGENTMESH_DATA_DIR": str(tmp_path),
                "AGENTMESH_NATS_URL": nats_url,
                "AGENTMESH_REGISTRY_BUCKET": bucket,
                **mesh_ca().env(),
            }
        )
        agents, offers, table = await asyncio.gather(
            arun_cli("agents", "-o", "json", env=env),
            arun_cli("find", "echo", "-o", "json", env=env),
            arun_cli("find", "echo", env=env),
        )
        assert agents.returncode == 0, agents.stderr
        assert [r["name"] for r in json.loads(agents.stdout)] == ["echoer"]
        assert offers.returncode == 0, offers.stderr
        assert [o["capability"]["name"] for o in json.loads(offers.stdout)] == ["echo"]
        assert "1 offer(s) of 'echo'" in table.stdout, table.stdout

        without_nats = {k: v for k, v in env.items() if k != "AGENTMESH_NATS_URL"}
        other = await arun_cli("agents", "-o", "json", env=without_nats)
        assert other.returncode == 0, other.stderr
        assert json.loads(other.stdout) == [], "the control plane's mesh has no agents"
