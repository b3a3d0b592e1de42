"""Standalone sidecars as real processes: ``python -m agentmesh sidecar`` beside a real app.

The app is the Node.js example (``examples/polyglot/app.js``, Node's standard library only),
started by the sidecar (``-- node app.js``) or by the test itself (``--app URL``, so that the
test can kill and restart it). A sidecar is ready when it printed
``<instance> serving <caps> at <endpoint> (app <url>, egress <url>)``, which it prints once its
record is in the registry and its egress serves.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import sys
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from .support import EXAMPLES, READY_TIMEOUT, STOP_TIMEOUT, popen_logged, tail

POLYGLOT = EXAMPLES / "polyglot"
MANIFEST = POLYGLOT / "agent.yaml"
APP = POLYGLOT / "app.js"
NODE = shutil.which("node")

needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (CI installs it)")

_READY_RE = re.compile(
    r"^(?P<instance>\S+) serving (?P<caps>.+) at (?P<endpoint>https?://\S+) "
    r"\(app (?P<app>\S+), egress (?P<egress>\S+)\)\s*$",
    re.MULTILINE,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SidecarProcess:
    """One ``python -m agentmesh sidecar`` child process."""

    def __init__(
        self, args: Iterable[str], env: Mapping[str, str], log: Path, manifest: Path = MANIFEST
    ) -> None:
        self.log = log
        self.args = [
            sys.executable,
            "-m",
            "agentmesh",
            "sidecar",
            "--manifest",
            str(manifest),
            "--egress-port",
            "0",
            "--log-level",
            "info",
            *args,
        ]
        self.proc = popen_logged(self.args, log, env)
        self.instance_id = self.endpoint = self.app_url = self.egress_url = ""

    def __repr__(self) -> str:
        return f"SidecarProcess(pid {self.proc.pid}, {self.instance_id or 'starting'})"

    def tail(self, lines: int = 30) -> str:
        return tail(self.log, lines)

    def _ready(self) -> bool:
        match = _READY_RE.search(self.log.read_text(errors="replace"))
        if match is None:
            return False
        self.instance_id = match["instance"]
        self.endpoint = match["endpoint"]
        self.app_url = match["app"]
        self.egress_url = match["egress"]
        return True

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the sidecar exited with code {self.proc.returncode} before it was "
                    f"ready:\n{self.tail()}"
                )
            if loop.time() > deadline:
                raise AssertionError(f"the sidecar was not ready within {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def app_pid(self) -> int | None:
        """The pid of the app this sidecar started (its one child), None between restarts."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except FileNotFoundError:
            return None
        pids = [int(p) for p in children.split()]
        return pids[0] if len(pids) == 1 else None

    async def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (code := self.proc.poll()) is None:
            if loop.time() > deadline:
                raise AssertionError(f"the sidecar did not exit within {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.02)
        return code


class NodeApp:
    """The example app started by the test (``--app`` form), on a port the test chose."""

    def __init__(self, port: int, egress_url: str, log: Path, env: Mapping[str, str]) -> None:
        assert NODE is not None
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = popen_logged(
            [NODE, str(APP)],
            log,
            {**env, "AGENTMESH_APP_PORT": str(port), "AGENTMESH_EGRESS_URL": egress_url},
        )

    async def wait_up(self, timeout: float = READY_TIMEOUT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await asyncio.to_thread(healthy, self.url):
            if self.proc.poll() is not None or loop.time() > deadline:
                raise AssertionError(f"the app did not come up:\n{tail(self.log)}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def served(app_url: str) -> dict[str, int]:
    """What the app counted per path (``GET /served``): what reached it."""
    result: dict[str, int] = get_json(f"{app_url}/served")
    return result
