"""Start ``python -m agentmesh control`` as a real process on a given NATS (test helper)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.e2e.support import READY_TIMEOUT, clean_env, popen_logged, tail
from tests.mesh_ca import mesh_ca

CLI_TIMEOUT = 30
STOP_TIMEOUT = 15.0  # generous: a control plane drains its sidecar and its NATS on SIGTERM

#: The environment of a test's CLI or control process: none of the caller's AGENTMESH_*.
cli_env = clean_env


def control_tls(data_dir: Path) -> ssl.SSLContext:
    """What a test's own HTTP client verifies a control plane by: the roots it wrote to its
    data dir (as the CLI on its machine does)."""
    from agentmesh.security.control_trust import roots_context

    return roots_context((data_dir / "roots.pem").read_text())


class ControlProcess:
    """``python -m agentmesh control`` as a real process, started and stopped as an operator
    would: on ``port`` (0: a free one; a fixed one survives restarts), with ``workdir`` as its
    data dir and log place, on ``nats_url`` (None: its embedded NATS), with ``env`` added to a
    clean environment. Ready when it wrote its ready file (the URLs and token files, ``info``).
    """

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        *,
        nats_url: str | None = None,
        port: int = 0,
        name: str = "control plane",
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self._env = {"AGENTMESH_DATA_DIR": str(workdir), **(env or {})}
        self.nats_url = nats_url
        self.port = port
        self.name = name
        self.log = workdir / "control.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self._runs = 0

    def start(self, timeout: float = READY_TIMEOUT, **env: str) -> ControlProcess:
        """Start it (``env``: more variables for this run) and wait until it is ready."""
        self._runs += 1
        ready = self.workdir / f"control-{self._runs}.json"
        ready.unlink(missing_ok=True)  # another control plane ran in this directory before
        args = [sys.executable, "-m", "agentmesh", "control", "--port", str(self.port)]
        args += ["--ready-file", str(ready)]
        if self.nats_url is not None:
            args += ["--nats-url", self.nats_url]
        proc = popen_logged(args, self.log, clean_env({**self._env, **env}))
        self.proc = proc
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {proc.returncode}:\n{tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready in {timeout}s:\n{tail(self.log)}")
            time.sleep(0.02)
        self.info = json.loads(ready.read_text())
        return self

    @property
    def url(self) -> str:
        url: str = self.info["control_url"]
        return url

    @property
    def admin_token(self) -> str:
        return Path(self.info["admin_token_file"]).read_text().strip()

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_token}"}

    def tls(self) -> ssl.SSLContext:
        return control_tls(self.workdir)

    def stop(self) -> None:
        """SIGTERM, as an operator stops it: it must exit 0 within STOP_TIMEOUT."""
        assert self.proc is not None, f"{self.name} was never started"
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(STOP_TIMEOUT) == 0, tail(self.log)

    def close(self) -> None:
        """Teardown: stop it if it still runs; one that ignores SIGTERM for STOP_TIMEOUT is
        killed, and that is a failure (a hung shutdown)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"{self.name} ignored SIGTERM:\n{tail(self.log)}") from None


@contextlib.contextmanager
def control_process(
    nats_url: str,
    bucket: str,
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    own_ca: bool = False,
) -> Iterator[str]:
    """A control plane on ``nats_url`` and ``bucket``; yields its URL; SIGTERM at the end.

    It runs with the suite's test CA, as the in-process sidecars of the test do: one mesh has
    one CA (each side refuses the other's signed state and records otherwise); ``own_ca``:
    a self-managed CA in its data dir instead. ``env`` adds variables.
    """
    extra = {
        "AGENTMESH_REGISTRY_BUCKET": bucket,
        **({} if own_ca else mesh_ca().env()),
        **(env or {}),
    }
    control = ControlProcess(tmp_path, extra, nats_url=nats_url)
    try:
        yield control.start().url
    finally:
        control.close()


def run_cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m agentmesh ARGS`` to completion, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "agentmesh", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=CLI_TIMEOUT,
        check=False,
    )


async def arun_cli(
    *args: str, env: Mapping[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``run_cli`` for async tests: the event loop (and in-process agents' leases) keeps going;
    ``stdin``: what the command reads (else nothing)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentmesh",
        *args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), CLI_TIMEOUT
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess(
        list(args), proc.returncode, out.decode("utf-8"), err.decode("utf-8")
    )
