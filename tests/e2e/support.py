"""Helpers of the end-to-end suite: agents as real ``python -m agentmesh run`` processes.

Nothing here is mocked. Every agent is its own interpreter with its own sidecar, talking to
the session's real nats-server on 127.0.0.1 and serving real HTTP. Output goes to a log file
per process (never an undrained pipe); a process is ready when it printed its
``<instance> serving <caps> at <endpoint>`` line, which the agent prints only after its record
is in the registry, and visible when the test's ``mesh`` sees that instance in its index.
At teardown every process still running gets SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from agentmesh import Mesh
from agentmesh._process import parent_death_hook
from tests.mesh_ca import mesh_ca

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
EXAMPLE_AGENTS = EXAMPLES / "agents"

#: What the e2e agents run with: renew every 0.25 s, expire 3 s after the last renewal, so a
#: stall of the loaded test machine (two shared cores) up to 2.75 s costs no agent its record:
#: staying registered is what most tests rely on, not what they test.
HEARTBEAT = 0.25
LEASE = 3
#: The lease of an agent whose expiry a test waits for (SIGKILLed with no deregistration):
#: short, so the wait is too; it only has to stay registered until it is killed.
SHORT_LEASE = 1

READY_TIMEOUT = 25.0  # generous: two shared cores, several interpreters starting at once
VISIBLE_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

_READY_RE = re.compile(
    r"^(?P<instance>\S+) serving (?P<caps>.+) at (?P<endpoint>https?://\S+)\s*$", re.MULTILINE
)


def clean_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This environment without any ``AGENTMESH_*`` variable (nor a terminal's size), plus
    ``overrides``.

    An override of None removes the variable. Output is unbuffered so that log files show
    each line as soon as it is printed.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AGENTMESH_") and k not in ("COLUMNS", "LINES")
    }
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def mesh_env(
    nats_url: str,
    bucket: str,
    data_dir: Path,
    overrides: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """The environment of a process that joins the test's mesh directly through NATS."""
    return clean_env(
        {
            "AGENTMESH_NATS_URL": nats_url,
            "AGENTMESH_REGISTRY_BUCKET": bucket,
            "AGENTMESH_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "AGENTMESH_LEASE_TTL": str(LEASE),
            "AGENTMESH_DRAIN_GRACE": "2",
            "AGENTMESH_DATA_DIR": str(data_dir),
            # never used while AGENTMESH_NATS_URL is set; a closed port if it ever were
            "AGENTMESH_CONTROL_URL": "http://127.0.0.1:9",
            # mTLS on: the agent issues its certificate from the test process's CA
            **mesh_ca().env(),
            **(overrides or {}),
        }
    )


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def terminate_all(procs: Iterable[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every running process, wait up to ``timeout`` in total, then SIGKILL."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def popen_logged(
    args: list[str], log: Path, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``args`` with stdout and stderr appended to ``log``; it dies with this process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd or log.parent,
            preexec_fn=parent_death_hook(),
        )


class AgentProcess:
    """One ``python -m agentmesh run FILE`` child process."""

    def __init__(self, file: Path, args: Iterable[str], env: Mapping[str, str], log: Path) -> None:
        self.file = file
        self.log = log
        self.args = [sys.executable, "-m", "agentmesh", "run", str(file), *args]
        self.proc = popen_logged(self.args, log, env)
        self.instance_id = ""
        self.endpoint = ""
        self.capabilities: list[str] = []

    def __repr__(self) -> str:
        return f"AgentProcess({self.file.name}, pid {self.pid}, {self.instance_id or 'starting'})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 20) -> str:
        return tail(self.log, lines)

    def _ready(self) -> bool:
        match = _READY_RE.search(self.log.read_text(errors="replace"))
        if match is None:
            return False
        self.instance_id = match["instance"]
        self.endpoint = match["endpoint"]
        self.capabilities = [c.strip() for c in match["caps"].split(",")]
        return True

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.file.name} exited with code {self.proc.returncode} before it was "
                f"ready:\n{self.tail()}"
            )

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the agent printed its ready line (it is registered by then)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._ready():
            self._check_alive()
            if loop.time() > deadline:
                raise AssertionError(
                    f"{self.file.name} was not ready within {timeout}s:\n{self.tail()}"
                )
            await asyncio.sleep(0.05)

    def wait_ready_sync(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.file.name} was not ready within {timeout}s:\n{self.tail()}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no drain, no deregistration; only the lease can remove its record."""
        self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: drain, deregister, exit 0."""
        self.proc.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (code := self.proc.poll()) is None:
            if loop.time() > deadline:
                raise AssertionError(
                    f"{self.file.name} did not exit within {timeout}s:\n{self.tail()}"
                )
            await asyncio.sleep(0.01)
        return code


SpawnAgent = Callable[..., Awaitable[AgentProcess]]


def instance_ids(mesh: Mesh) -> set[str]:
    """The instances in the mesh's local (watch-fed) index right now; no I/O."""
    return {r.instance_id for r in mesh.sidecar.index.records()}


class SharedAgents:
    def __init__(self, bucket: str, agents: list[AgentProcess]) -> None:
        self.bucket = bucket
        self.agents = agents

    @property
    def instance_ids(self) -> set[str]:
        return {a.instance_id for a in self.agents}


def processes_mentioning(needle: str) -> list[str]:
    """``pid: cmdline`` of every live process whose command line or environment has ``needle``."""
    found = []
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if state == "Z":  # a zombie holds nothing; its parent just has not reaped it
            continue
        try:
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            environ = ""
        if needle in cmdline or needle in environ:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found
