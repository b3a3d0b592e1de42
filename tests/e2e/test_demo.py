"""``agentmesh demo`` as a user runs it: a whole mesh, an orchestration, then nothing left over."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from .support import clean_env, processes_mentioning

DEMO_TIMEOUT = 90


def test_demo_runs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # The demo makes its work dir with tempfile.mkdtemp(prefix="agentmesh-demo-"); pointing
    # TMPDIR here tells our demo's processes apart from anyone else's on this machine.
    env = clean_env({"TMPDIR": str(tmp_path), "COLUMNS": None})
    done = subprocess.run(
        [sys.executable, "-m", "agentmesh", "demo"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert "who offers what" in output
    researchers = set(re.findall(r"researcher-[0-9a-f]{8}", output))
    assert len(researchers) == 2, output
    for capability in ("research", "summarize", "plan", "draft"):
        assert capability in output
    assert "summary" in output
    # Zero trust by default: mTLS identities, and an access policy enforced live.
    assert "mTLS (strict)" in output, output
    # ... and a NATS that speaks TLS and admits only enrolled workloads (tests/nats).
    assert re.search(r"NATS \(embedded, JetStream\) at tls://127\.0\.0\.1:\d+: TLS", output)
    assert "spiffe://agentmesh.local/agent/researcher" in output
    assert re.search(r"client → summarize: denied .*rule 'no-direct-summaries'", output, re.S), (
        output
    )
    assert "planner → summarize: allowed" in output
    # Any language: the Node.js agent behind `agentmesh sidecar` (CI installs node).
    if shutil.which("node"):
        assert "shout (Node.js, headliner-" in output, output
        assert "countdown streamed through the sidecar: [3, 2, 1]" in output
        assert "Node.js called summarize (Python) through its egress" in output
    else:
        assert "skipped the Node.js agent (examples/polyglot): `node` is not installed" in output
    assert re.search(r"stopped \d+ processes cleanly", output), output
    assert "did not stop cleanly" not in output, output

    demo_dir = str(tmp_path / "agentmesh-demo-")
    assert processes_mentioning(demo_dir) == [], "the demo left processes running"
    leftovers = [p for p in processes_mentioning(str(tmp_path)) if "nats-server" in p]
    assert leftovers == [], "the demo left its nats-server running"
    assert not list(tmp_path.glob("agentmesh-demo-*")), "a successful demo removes its work dir"
