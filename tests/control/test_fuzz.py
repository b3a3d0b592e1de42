"""The control plane's OpenAPI, fuzzed by schemathesis against a real control process: no 500s.

Every documented operation gets generated valid and invalid requests (coverage, fuzzing and
stateful phases), authenticated with the admin token, against a control plane with its own NATS
bucket and data dir, so whatever the fuzzer creates, revokes or deletes stays in this test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agentmesh import Settings
from agentmesh.security.files import admin_token
from tests.control.control_process import control_process

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_no_operation_of_the_control_plane_answers_500(
    nats_url: str, bucket: str, tmp_path: Path
) -> None:
    assert SCHEMATHESIS.exists(), "schemathesis is part of the [dev] extra"
    with control_process(nats_url, bucket, tmp_path, own_ca=True) as control_url:
        token = admin_token(Settings(data_dir=tmp_path))
        done = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                f"{control_url}/openapi.json",
                "--header",
                f"Authorization: Bearer {token}",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "10",
                "--seed",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    summary = done.stdout[-3000:]
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert "passed" in summary
